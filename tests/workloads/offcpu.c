/* Off-CPU workloads whose blocked time is known by construction, for tests/tests/offcpu.rs
 * and the bench. Each runs for SECONDS (default 3), then exits.
 *
 *   offcpu sleep [SECONDS]    one thread: spin 10 ms (wall clock) in spin_phase, then sleep
 *                             30 ms in sleep_phase, round after round: 75 % of wall time off CPU;
 *                             prints the sleeps made
 *   offcpu pipe [SECONDS]     ping-pong of one byte over two pipes between pinger (a thread)
 *                             and ponger (main), each spinning 50 us per message
 *   offcpu mutex [SECONDS]    main and a thread take one pthread mutex in lock_and_work,
 *                             hold it 2 ms and leave it 1 ms: each waits for the other
 *   offcpu storm [SECONDS [wait [SPIN_US]]]  the pipe ping-pong without the spinning (or
 *                             SPIN_US, fractional, per message): as many context switches as
 *                             the machine makes (the bench's workload); with `wait`, starts
 *                             on a line on stdin; prints the rounds made
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double deadline;
static int to_pong[2], to_ping[2];
static double spin_us_per_message = 50;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static volatile unsigned long sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void spin_for(double seconds) {
    double until = now() + seconds;
    while (now() < until)
        sink++;
}

__attribute__((noinline)) void spin_phase(void) { spin_for(0.010); }

__attribute__((noinline)) void sleep_phase(void) {
    struct timespec t = {0, 30 * 1000 * 1000};
    nanosleep(&t, NULL);
}

__attribute__((noinline)) void pinger_round(void) {
    char byte = 1;
    if (write(to_pong[1], &byte, 1) != 1 || read(to_ping[0], &byte, 1) != 1)
        exit(1);
}

__attribute__((noinline)) void ponger_round(void) {
    char byte;
    if (read(to_pong[0], &byte, 1) != 1)
        exit(1);
    if (spin_us_per_message)
        spin_for(spin_us_per_message / 1e6);
    if (write(to_ping[1], &byte, 1) != 1)
        exit(1);
}

static void *pinger(void *arg) {
    (void)arg;
    for (;;) {
        if (spin_us_per_message)
            spin_for(spin_us_per_message / 1e6);
        pinger_round();
    }
    return NULL;
}

__attribute__((noinline)) void lock_and_work(void) {
    pthread_mutex_lock(&lock);
    spin_for(0.002);
    pthread_mutex_unlock(&lock);
    /* Unlocked for a while, so that the lock changes hands rather than one thread starving. */
    spin_for(0.001);
}

static void *locker(void *arg) {
    (void)arg;
    for (;;)
        lock_and_work();
    return NULL;
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "sleep";
    if (argc > 3 && strcmp(argv[3], "wait") == 0)
        getchar();
    deadline = now() + (argc > 2 ? atof(argv[2]) : 3.0);
    pthread_t thread;
    if (strcmp(mode, "sleep") == 0) {
        unsigned long sleeps = 0;
        while (now() < deadline) {
            spin_phase();
            sleep_phase();
            sleeps++;
        }
        printf("%lu\n", sleeps);
    } else if (strcmp(mode, "pipe") == 0 || strcmp(mode, "storm") == 0) {
        if (strcmp(mode, "storm") == 0)
            spin_us_per_message = argc > 4 ? atof(argv[4]) : 0;
        if (pipe(to_pong) || pipe(to_ping) || pthread_create(&thread, NULL, pinger, NULL))
            return 1;
        unsigned long rounds = 0;
        while (now() < deadline) {
            ponger_round();
            rounds++;
        }
        printf("%lu\n", rounds);
    } else if (strcmp(mode, "mutex") == 0) {
        if (pthread_create(&thread, NULL, locker, NULL))
            return 1;
        while (now() < deadline)
            lock_and_work();
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    /* exit() ends the other thread wherever it waits. */
    fflush(stdout);
    exit(0);
}
