/* Maps hostile files executable, as a loader would, next to a process that is profiled as
 * usual: the profiler must parse the first and go on profiling both.
 *
 *   hostile_maps SECONDS FILE...  forks a child that spins in spin_elsewhere; the parent maps
 *                                 every FILE (PROT_READ | PROT_EXEC), then spins in
 *                                 spin_with_maps, calling cos from a libm it loads only then:
 *                                 its first samples there are in no mapping the profiler knows,
 *                                 so it reads the mappings again, hostile files included
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

static volatile unsigned long sink;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double (*cosine)(double);

NOINLINE void spin_with_maps(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 100000; i++)
            sink += (unsigned long)cosine((double)(i ^ (sink >> 3)));
}

NOINLINE void spin_elsewhere(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 100000; i++)
            sink += i ^ (sink >> 5);
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: hostile_maps SECONDS FILE...\n");
        return 2;
    }
    double seconds = atof(argv[1]);
    pid_t child = fork();
    if (child == 0) {
        spin_elsewhere(seconds);
        _exit(0);
    }
    for (int i = 2; i < argc; i++) {
        int fd = open(argv[i], O_RDONLY);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0 ||
            mmap(NULL, st.st_size, PROT_READ | PROT_EXEC, MAP_PRIVATE, fd, 0) == MAP_FAILED) {
            perror(argv[i]);
            return 1;
        }
        close(fd);
    }
    void *libm = dlopen("libm.so.6", RTLD_NOW);
    if (!libm || !(cosine = (double (*)(double))dlsym(libm, "cos"))) {
        fprintf(stderr, "libm: %s\n", dlerror());
        return 1;
    }
    spin_with_maps(seconds);
    int status;
    waitpid(child, &status, 0);
    return 0;
}
