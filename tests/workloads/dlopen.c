/* Says "ready" and spins until a line arrives on stdin, then dlopen()s argv[1] and spins in
 * its lib_spin for good: the library is mapped long after the profiler, sampling the spin,
 * first read the maps. */
#include <dlfcn.h>
#include <poll.h>
#include <stdio.h>

/* Busy until stdin is readable (a blocked process is never sampled, so never read). */
__attribute__((noinline)) static void spin_until_told(void) {
    struct pollfd in = {.fd = 0, .events = POLLIN};
    volatile unsigned long x = 0;
    while (poll(&in, 1, 0) == 0)
        for (int i = 0; i < 100000; i++)
            x += i;
}

typedef unsigned long (*spin_fn)(unsigned long);

__attribute__((noinline)) static unsigned long call_lib(spin_fn spin, unsigned long n) {
    return spin(n * 2) + 1;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return 2;
    printf("ready\n");
    fflush(stdout);
    spin_until_told();
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "%s\n", dlerror());
        return 4;
    }
    spin_fn spin = (spin_fn)dlsym(lib, "lib_spin");
    return (int)call_lib(spin, (unsigned long)argc);
}
