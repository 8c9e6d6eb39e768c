/* The library dlopen.c loads once it is told to: a frameless leaf under one frame. */
__attribute__((noinline)) static unsigned long lib_leaf(unsigned long n) {
    volatile unsigned long x = n;
    for (;;)
        x = x * 31 + 7;
    return x;
}

__attribute__((noinline)) unsigned long lib_spin(unsigned long n) {
    return lib_leaf(n + 1) ^ 3;
}
