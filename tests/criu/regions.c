/* A program of many one-page memory regions, and optionally a zombie child, for the CRIU tests
 * of trees and region counts (tests/criu/test_trees.py, benchmarks/criu.py).
 *
 * Usage: regions DIR N [zombie] [fork]
 * Before the dump it maps N private anonymous one-page regions, each its own VMA (an unmapped
 * page between any two, so none merge), and fills every word of each with a value derived from
 * the word's address (never zero). "zombie" forks a child that exits with status 7 at once and
 * is not reaped: the dump then holds a zombie. It writes DIR/ready and waits for DIR/go.
 * After the restore it checks every byte of every region and writes DIR/result: "PASS N
 * SECONDS" (the seconds the check took) or what was wrong (the first bad region, the word it
 * held and the word expected). "fork": the first half is checked, then a forked child checks
 * the second half (its faults come on the child's uffd, whose ranges are the N regions) and
 * writes DIR/result-child, then the parent checks the second half too. With "zombie", the
 * zombie is reaped last and must have exited 7. A SIGBUS writes "SIGBUS at ADDR". */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static char result_path[4096];

static uint64_t word(uintptr_t address)
{
    uint64_t v = (uint64_t)address * 0x9E3779B97F4A7C15ULL + 0x0123456789ABCDEFULL;
    return v ? v : 1;
}

static void report(const char *text)
{
    int fd = open(result_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
        ssize_t ignored = write(fd, text, strlen(text));
        (void)ignored;
        close(fd);
    }
}

static void on_sigbus(int sig, siginfo_t *info, void *context)
{
    (void)sig;
    (void)context;
    char text[64];
    snprintf(text, sizeof text, "SIGBUS at %p", info->si_addr);
    report(text);
    _exit(3);
}

/* Region i is the page at base + 2 * i * PAGE. */
static int check(const char *what, char *base, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        const uint64_t *w = (const uint64_t *)(base + 2 * i * PAGE);
        for (size_t k = 0; k < PAGE / 8; k++) {
            uint64_t want = word((uintptr_t)&w[k]);
            if (w[k] != want) {
                char text[256];
                snprintf(text, sizeof text,
                         "%s: region %zu (page %p) word %zu held 0x%016llx, expected 0x%016llx",
                         what, i, (const void *)w, k, (unsigned long long)w[k],
                         (unsigned long long)want);
                report(text);
                return 0;
            }
        }
    }
    return 1;
}

static int zombie_state(pid_t pid)
{
    char path[64], text[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0)
        return 0;
    text[n] = 0;
    char *paren = strrchr(text, ')');
    return paren && paren[1] == ' ' && paren[2] == 'Z';
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t n = strtoul(argv[2], NULL, 10);
    int zombie = 0, forking = 0;
    for (int a = 3; a < argc; a++) {
        zombie |= strcmp(argv[a], "zombie") == 0;
        forking |= strcmp(argv[a], "fork") == 0;
    }
    snprintf(result_path, sizeof result_path, "%s/result", argv[1]);
    char ready[4096], go[4096];
    snprintf(ready, sizeof ready, "%s/ready", argv[1]);
    snprintf(go, sizeof go, "%s/go", argv[1]);

    char *base = mmap(NULL, 2 * n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (base == MAP_FAILED)
        return 4;
    for (size_t i = 0; i < n; i++) {
        if (munmap(base + (2 * i + 1) * PAGE, PAGE) != 0)
            return 4;
        uint64_t *w = (uint64_t *)(base + 2 * i * PAGE);
        for (size_t k = 0; k < PAGE / 8; k++)
            w[k] = word((uintptr_t)&w[k]);
    }
    pid_t dead = -1;
    if (zombie) {
        dead = fork();
        if (dead < 0)
            return 4;
        if (dead == 0)
            _exit(7);
        for (int tries = 0; !zombie_state(dead); tries++) {
            if (tries > 5000)
                return 4;
            usleep(1000);
        }
    }

    int fd = open(ready, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return 4;
    close(fd);
    while (access(go, F_OK) != 0)
        usleep(10000);

    /* Restored. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGBUS, &sa, NULL);
    alarm(200);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    size_t half = forking ? n / 2 : n;
    if (!check("parent", base, 0, half))
        return 1;
    if (forking) {
        pid_t child = fork();
        if (child < 0) {
            report("fork failed");
            return 1;
        }
        if (child == 0) {
            snprintf(result_path, sizeof result_path, "%s/result-child", argv[1]);
            if (!check("child", base, half, n))
                _exit(1);
            report("PASS");
            _exit(0);
        }
        int status = 0;
        if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status)) {
            char text[128];
            snprintf(text, sizeof text, "the forked child failed (status 0x%x): see result-child",
                     status);
            report(text);
            return 1;
        }
        if (!check("parent after the fork", base, half, n))
            return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (zombie) {
        int status = 0;
        if (waitpid(dead, &status, 0) != dead || !WIFEXITED(status) || WEXITSTATUS(status) != 7) {
            char text[128];
            snprintf(text, sizeof text, "the zombie %d did not reap as exit 7 (status 0x%x)",
                     (int)dead, status);
            report(text);
            return 1;
        }
    }
    char text[128];
    snprintf(text, sizeof text, "PASS %zu %.6f", n,
             (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    report(text);
    return 0;
}
