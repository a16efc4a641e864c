/* A program of many one-page memory regions, optionally a zombie child, optionally many tasks,
 * for the CRIU tests of trees and region counts (tests/criu/test_trees.py, benchmarks/criu.py).
 *
 * Usage: regions DIR N [zombie] [fork] [tasks T]
 * Before the dump it maps N private anonymous one-page regions, each its own VMA (an unmapped
 * page between any two, so none merge), and fills every word of each with a value derived from
 * the word's address (never zero). "zombie" forks a child that exits with status 7 at once and
 * is not reaped: the dump then holds a zombie. It writes DIR/ready and waits for DIR/go.
 * After the restore it checks every byte of every region and writes DIR/result: "PASS N
 * SECONDS" (the seconds the check took) or what was wrong (the first bad region, the word it
 * held and the word expected). "fork": the first half is checked, then a forked child checks
 * the second half (its faults come on the child's uffd, whose ranges are the N regions) and
 * writes DIR/result-child, then the parent checks the second half too. With "zombie", the
 * zombie is reaped last and must have exited 7. A SIGBUS writes "SIGBUS at ADDR".
 *
 * "tasks T": before mapping anything the program forks T-1 children, tasks 1 to T-1 (the
 * program is task 0), each of which maps N regions of its own (forked before any mapping, so
 * with the same layout: here at the same addresses as its siblings') and fills each word with a value
 * derived from (task index, word address), never zero: a daemon that served one task's pages
 * to another would be found. DIR/ready is written once every task is filled. After DIR/go,
 * every task checks every byte of its own regions at the same time as the others and writes
 * DIR/result-TASK ("PASS N SECONDS" or what was wrong, as above); task 0 then reaps every
 * child, and DIR/result says "PASS N SECONDS" (the seconds until the last task was reaped)
 * only if its own check passed and every child exited 0, or else the first task that failed,
 * its wait status and the file to read. "fork" and "zombie" apply to task 0 only. */
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
/* Which task of "tasks T" this process is (0: the program itself). */
static unsigned task_index;

/* Task 0's words are the address's alone (as before "tasks" existed); task i's differ from
 * every other task's at the same address. */
static uint64_t word(uintptr_t address)
{
    uint64_t v = (uint64_t)address * 0x9E3779B97F4A7C15ULL + 0x0123456789ABCDEFULL;
    v ^= (uint64_t)task_index * 0xD6E8FEB86659FD93ULL;
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

/* N one-page regions, region i at base + 2 * i * PAGE, each word filled for this task. */
static char *map_regions(size_t n)
{
    char *base = mmap(NULL, 2 * n * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (base == MAP_FAILED)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        if (munmap(base + (2 * i + 1) * PAGE, PAGE) != 0)
            return NULL;
        uint64_t *w = (uint64_t *)(base + 2 * i * PAGE);
        for (size_t k = 0; k < PAGE / 8; k++)
            w[k] = word((uintptr_t)&w[k]);
    }
    return base;
}

static void wait_for_go(const char *go)
{
    while (access(go, F_OK) != 0)
        usleep(10000);
}

/* Restored: a SIGBUS is reported, and a check that hangs ends. */
static void restored(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGBUS, &sa, NULL);
    alarm(200);
}

static double since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0->tv_sec) + (t1.tv_nsec - t0->tv_nsec) / 1e9;
}

/* Task TASK of "tasks T" (a forked child): map and fill its regions, tell task 0 on READY,
 * wait for GO, check them all, write DIR/result-TASK. Never returns. */
static void child_task(const char *dir, unsigned task, size_t n, int ready, const char *go)
{
    task_index = task;
    snprintf(result_path, sizeof result_path, "%s/result-%u", dir, task);
    char *base = map_regions(n);
    if (base == NULL) {
        report("could not map the regions");
        _exit(4);
    }
    if (write(ready, "r", 1) != 1)
        _exit(4);
    close(ready);
    wait_for_go(go);
    restored();
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    char what[32];
    snprintf(what, sizeof what, "task %u", task);
    if (!check(what, base, 0, n))
        _exit(1);
    char text[128];
    snprintf(text, sizeof text, "PASS %zu %.6f", n, since(&t0));
    report(text);
    _exit(0);
}

int main(int argc, char **argv)
{
    if (argc < 3)
        return 2;
    size_t n = strtoul(argv[2], NULL, 10);
    int zombie = 0, forking = 0;
    unsigned tasks = 1;
    for (int a = 3; a < argc; a++) {
        zombie |= strcmp(argv[a], "zombie") == 0;
        forking |= strcmp(argv[a], "fork") == 0;
        if (strcmp(argv[a], "tasks") == 0 && a + 1 < argc)
            tasks = (unsigned)strtoul(argv[++a], NULL, 10);
    }
    if (tasks < 1 || tasks > 4096)
        return 2;
    char ready[4096], go[4096];
    snprintf(ready, sizeof ready, "%s/ready", argv[1]);
    snprintf(go, sizeof go, "%s/go", argv[1]);
    if (tasks > 1)
        snprintf(result_path, sizeof result_path, "%s/result-0", argv[1]);
    else
        snprintf(result_path, sizeof result_path, "%s/result", argv[1]);

    /* Tasks 1 to T-1 first, so that none inherits task 0's regions. Each says it is filled
     * with a byte on a pipe that is closed before the dump. */
    pid_t *children = calloc(tasks, sizeof *children);
    int filled[2];
    if (children == NULL || pipe(filled) != 0)
        return 4;
    for (unsigned t = 1; t < tasks; t++) {
        children[t] = fork();
        if (children[t] < 0)
            return 4;
        if (children[t] == 0) {
            close(filled[0]);
            child_task(argv[1], t, n, filled[1], go);
        }
    }
    close(filled[1]);
    char *base = map_regions(n);
    if (base == NULL)
        return 4;
    for (unsigned got = 1; got < tasks;) {
        char byte;
        ssize_t r = read(filled[0], &byte, 1);
        if (r == 1)
            got++;
        else if (r == 0)
            return 4; /* a child died before it was filled */
    }
    close(filled[0]);
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
    wait_for_go(go);

    restored();
    struct timespec t0;
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
    if (tasks > 1) {
        char text[128];
        snprintf(text, sizeof text, "PASS %zu %.6f", n, since(&t0));
        report(text); /* task 0's own check, in result-0 */
        snprintf(result_path, sizeof result_path, "%s/result", argv[1]);
        unsigned failed = 0;
        int failed_status = 0;
        for (unsigned t = 1; t < tasks; t++) {
            int status = 0;
            if (waitpid(children[t], &status, 0) != children[t])
                status = -1;
            if ((!WIFEXITED(status) || WEXITSTATUS(status)) && failed == 0) {
                failed = t;
                failed_status = status;
            }
        }
        if (failed) {
            snprintf(text, sizeof text, "task %u (pid %d) failed (status 0x%x): see result-%u",
                     failed, (int)children[failed], failed_status, failed);
            report(text);
            return 1;
        }
    }
    double seconds = since(&t0);
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
    snprintf(text, sizeof text, "PASS %zu %.6f", n, seconds);
    report(text);
    return 0;
}
