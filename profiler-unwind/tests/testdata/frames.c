/* The unwinder's test program. tests/common/mod.rs builds it with
 *   cc -O2 -fomit-frame-pointer -g frames.c
 * (and variants), so that no function keeps a frame pointer and the leaves build no frame.
 *
 * It calls main -> level1 -> level2 -> level3 -> big_frame (40 KiB of locals) -> leaf, prints
 * "ready" from big_frame and spins in leaf forever. On SIGUSR1 the handler prints "handler" and
 * spins in handler_spin, so a snapshot then holds a signal frame. With the argument "vdso" it
 * calls clock_gettime (the vDSO's) in a loop from vdso_loop instead; with "deep" it recurses 300
 * deep in recurse before spinning in leaf; with "qsort" it spins in leaf from a qsort comparator,
 * below libc's qsort. Every call is followed by work
 * so that none becomes a tail call and every caller stays on the stack. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define KEEP __attribute__((noipa))

volatile unsigned long sink;

/* A restorer outside any function: top-level asm gets no CFI, as musl's __restore_rt. */
__asm__(".text\n"
        ".globl bare_restorer\n"
        ".type bare_restorer, @function\n"
        "bare_restorer:\n"
        "  mov $15, %rax\n"
        "  syscall\n"
        ".size bare_restorer, .-bare_restorer\n");

/* Goes through the PLT to libc's write. */
KEEP void say(const char *line) {
    if (write(1, line, strlen(line)) < 0)
        abort();
    sink++;
}

KEEP void handler_spin(void) {
    for (;;)
        sink++;
}

KEEP void on_signal(int sig) {
    say(sig == SIGUSR1 ? "handler\n" : "other\n");
    handler_spin();
    sink++;
}

/* A leaf that builds no frame. */
KEEP void leaf(unsigned long n) {
    for (;;)
        sink += n;
}

/* 40 KiB of locals: a CFA offset far beyond 16 signed bits. */
KEEP void big_frame(unsigned long n) {
    volatile char buf[40 * 1024];
    buf[n % sizeof buf] = (char)n;
    say("ready\n");
    leaf(buf[(n * 7) % sizeof buf]);
    sink += buf[0];
}

KEEP unsigned long level3(unsigned long n) {
    big_frame(n + 1);
    return n ^ sink;
}

KEEP unsigned long level2(unsigned long n) { return level3(n * 3) + 1; }

KEEP unsigned long level1(unsigned long n) { return level2(n + 2) * 5; }

KEEP void vdso_loop(void) {
    struct timespec now;
    say("ready\n");
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        sink += (unsigned long)now.tv_nsec;
    }
}

KEEP unsigned long recurse(unsigned long n) {
    if (n == 0) {
        say("ready\n");
        leaf(1);
    }
    return recurse(n - 1) + sink;
}

KEEP int compare_then_spin(const void *a, const void *b) {
    say("ready\n");
    leaf(1);
    return *(const int *)a - *(const int *)b;
}

KEEP void sort_numbers(void) {
    int numbers[64];
    for (int i = 0; i < 64; i++)
        numbers[i] = 64 - i;
    qsort(numbers, 64, sizeof numbers[0], compare_then_spin);
    sink += (unsigned long)numbers[0];
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "qsort") == 0) {
        sort_numbers();
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "deep") == 0) {
        sink = recurse(300);
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "vdso") == 0) {
        vdso_loop();
        return 0;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = on_signal;
    sigaction(SIGUSR1, &action, NULL);
    sink = level1((unsigned long)argc);
    return (int)(sink & 1);
}
