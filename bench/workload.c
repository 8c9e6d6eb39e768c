/* Benchmark workloads, built by `cargo xtask bench`.
 *
 *   workload work UNITS       a fixed amount of CPU-bound work, then exit (timed by the harness)
 *   workload duty SECONDS     a live process that wakes every 100 ms, burns about 1 ms, sleeps
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

__attribute__((noinline)) static void unit(void) {
    for (unsigned long i = 0; i < 1000000UL; i++)
        sink += i ^ (sink >> 3);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: workload work UNITS | duty SECONDS\n");
        return 2;
    }
    if (!strcmp(argv[1], "work")) {
        long units = atol(argv[2]);
        for (long i = 0; i < units; i++)
            unit();
    } else if (!strcmp(argv[1], "duty")) {
        double end = now() + atof(argv[2]);
        while (now() < end) {
            double burst = now() + 0.001;
            while (now() < burst)
                sink++;
            usleep(99000);
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    return 0;
}
