/* Test workloads with known call trees and CPU shares, built by the tests with frame pointers
 * at -O0: gcc drops the frame of leaf functions at -O1 and above even with
 * -fno-omit-frame-pointer, and a leaf without a frame hides its caller from the unwinder.
 *
 *   workload shares SECONDS   main -> heavy (60%), main -> light (30%), main -> middle -> leaf_c (10%)
 *   workload shares-cpu SECONDS  the same until it has used SECONDS of CPU time, however busy the
 *                             machine: a known number of samples
 *   workload syscalls SECONDS main -> syscall_loop -> write(2) to /dev/null, over and over
 *   workload fork SECONDS     main forks; the child runs child_burn, the parent waits
 *   workload burn SECONDS     main -> burn_outer -> burn_inner
 *   workload inline SECONDS   main -> with_inline -> inlined_leaf (always inlined)
 *   workload storm SECONDS N  forks N children that exit at once, one after the other, then a
 *                             child that runs child_burn (exit code 0)
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

/* CPU time this process has used. */
static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Each unit is the same amount of work, so shares follow the unit counts. */
#define SPIN(units)                                        \
    do {                                                   \
        for (unsigned long i = 0; i < (units) * 100000UL; i++) \
            sink += i ^ (sink >> 3);                       \
    } while (0)

/* The diff tests build a "head" where light costs twice as much (-DLIGHT_UNITS=6). */
#ifndef LIGHT_UNITS
#define LIGHT_UNITS 3
#endif

NOINLINE void heavy(void) { SPIN(1); }
NOINLINE void light(void) { SPIN(1); }
NOINLINE void leaf_c(void) { SPIN(1); }
NOINLINE void middle(void) { leaf_c(); }

/* One round of `shares`: 6 units of heavy, LIGHT_UNITS of light and 1 of middle, in a random
 * order. A fixed order repeats with a period the sampling timer can lock onto (a round is about
 * 1.5 ms, the timer 1 or 2 ms), which skewed the recorded shares by up to 20 points on some
 * machines; in a random order every phase of the timer sees every function in proportion.
 * A macro, not a function: main stays the caller of all three, even in the DWARF inline info. */
#define SHARES_UNITS (6 + LIGHT_UNITS + 1)
#define SHARES_ROUND(rng)                                            \
    do {                                                             \
        int order[SHARES_UNITS];                                     \
        for (int i = 0; i < SHARES_UNITS; i++)                       \
            order[i] = i < 6 ? 0 : i < 6 + LIGHT_UNITS ? 1 : 2;      \
        for (int i = SHARES_UNITS - 1; i > 0; i--) {                 \
            (rng) ^= (rng) << 13;                                    \
            (rng) ^= (rng) >> 7;                                     \
            (rng) ^= (rng) << 17;                                    \
            int j = (int)((rng) % (unsigned long)(i + 1));           \
            int t = order[i];                                        \
            order[i] = order[j];                                     \
            order[j] = t;                                            \
        }                                                            \
        for (int i = 0; i < SHARES_UNITS; i++) {                     \
            if (order[i] == 0)                                       \
                heavy();                                             \
            else if (order[i] == 1)                                  \
                light();                                             \
            else                                                     \
                middle();                                            \
        }                                                            \
    } while (0)

/* write(2) without libc's wrapper, which has no frame pointer and would hide this frame. */
static long raw_write(long fd, const void *buf, long len) {
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(1L), "D"(fd), "S"(buf), "d"(len)
                     : "rcx", "r11", "memory");
    return ret;
}

NOINLINE void syscall_loop(double seconds) {
    int fd = open("/dev/null", O_WRONLY);
    char buf[4096];
    memset(buf, 'x', sizeof buf);
    double end = now() + seconds;
    while (now() < end)
        for (int i = 0; i < 1000; i++)
            if (raw_write(fd, buf, sizeof buf) < 0)
                exit(1);
    close(fd);
}

NOINLINE void burn_inner(void) { SPIN(1); }
NOINLINE void burn_outer(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        burn_inner();
}

NOINLINE void child_burn(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        SPIN(1);
}

static inline __attribute__((always_inline)) void inlined_leaf(void) { SPIN(1); }
NOINLINE void with_inline(double seconds) {
    double end = now() + seconds;
    while (now() < end)
        inlined_leaf();
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: workload shares|syscalls|fork|burn|inline|storm SECONDS [N]\n");
        return 2;
    }
    double seconds = atof(argv[2]);
    double end = now() + seconds;
    if (!strcmp(argv[1], "shares")) {
        unsigned long rng = 0x9e3779b97f4a7c15UL ^ (unsigned long)getpid();
        while (now() < end)
            SHARES_ROUND(rng);
    } else if (!strcmp(argv[1], "shares-cpu")) {
        unsigned long rng = 0x9e3779b97f4a7c15UL ^ (unsigned long)getpid();
        while (cpu_now() < seconds)
            SHARES_ROUND(rng);
    } else if (!strcmp(argv[1], "syscalls")) {
        syscall_loop(seconds);
    } else if (!strcmp(argv[1], "fork")) {
        pid_t pid = fork();
        if (pid == 0) {
            child_burn(seconds);
            _exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
    } else if (!strcmp(argv[1], "burn")) {
        burn_outer(seconds);
    } else if (!strcmp(argv[1], "inline")) {
        with_inline(seconds);
    } else if (!strcmp(argv[1], "storm")) {
        long count = argc > 3 ? atol(argv[3]) : 0;
        int status;
        for (long i = 0; i < count; i++) {
            pid_t pid = fork();
            if (pid == 0)
                _exit(0);
            if (pid < 0 || waitpid(pid, &status, 0) < 0)
                return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            child_burn(seconds);
            _exit(0);
        }
        waitpid(pid, &status, 0);
        return 0;
    } else {
        fprintf(stderr, "unknown mode %s\n", argv[1]);
        return 2;
    }
    return argc > 3 ? atoi(argv[3]) : 0;
}
