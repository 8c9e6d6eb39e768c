/* Runs a loop from anonymous executable memory, as JIT-compiled code does, and prints
 * "PID START SIZE" of that code so that a test can write a perf map for it. Built static, so
 * that it runs alone inside a chroot. Usage: anonexec SECONDS */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    double deadline = now() + (argc > 1 ? atof(argv[1]) : 10.0);
    /* countdown: dec %rdi; jnz countdown; ret */
    static const unsigned char code[] = {0x48, 0xff, 0xcf, 0x75, 0xfb, 0xc3};
    void *mem = mmap(NULL, 4096, PROT_READ | PROT_WRITE | PROT_EXEC,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 1;
    memcpy(mem, code, sizeof code);
    printf("%d %lx %zx\n", getpid(), (unsigned long)mem, sizeof code);
    fflush(stdout);
    void (*countdown)(long) = (void (*)(long))mem;
    while (now() < deadline)
        countdown(10000000);
    return 0;
}
