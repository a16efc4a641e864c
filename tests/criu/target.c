/* The program the CRIU tests dump and restore lazily (tests/criu/test_lazy_pages.py).
 *
 * Usage: target DIR [slow]
 * Before the dump it maps private anonymous regions, fills their pages with words derived from
 * each word's address (never zero), leaves holes (pages never touched, pages only read), splits
 * a region with mprotect, writes DIR/ready, and waits for DIR/go. After the restore it checks
 * every page, forks (the child checks its copy), drops a range (MADV_DONTNEED: zeros), moves one
 * (mremap), unmaps one, writes, and writes DIR/result: "PASS", or what was wrong (the first bad
 * page and what it held). A SIGBUS writes "SIGBUS at ADDR". Exit status: 0 only if all is right.
 * "slow" sleeps between pages, so a test can kill the handler while faults are being served. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAGE 4096UL
#define NREGIONS 4

static const size_t pages_of[NREGIONS] = {64, 512, 2048, 1};
static char *region[NREGIONS];
static char result_path[4096];
static int slow;

static uint64_t word(uintptr_t address, unsigned generation)
{
    uint64_t v = (uint64_t)address * 0x9E3779B97F4A7C15ULL + 0x0123456789ABCDEFULL + generation;
    return v ? v : 1;
}

/* Region 1 (index 1) has holes: pages i % 5 == 3 never touched, i % 11 == 7 only read. */
static int is_hole(int r, size_t i) { return r == 1 && (i % 5 == 3 || i % 11 == 7); }

static void fill(char *page, uintptr_t as_if, unsigned generation)
{
    uint64_t *w = (uint64_t *)page;
    for (size_t k = 0; k < PAGE / 8; k++)
        w[k] = word(as_if + k * 8, generation);
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

/* Check the page at `page`: it must hold the words of address `as_if` (generation), or zeros. */
static int check(const char *what, const char *page, uintptr_t as_if, unsigned generation, int zero)
{
    const uint64_t *w = (const uint64_t *)page;
    for (size_t k = 0; k < PAGE / 8; k++) {
        uint64_t want = zero ? 0 : word(as_if + k * 8, generation);
        if (w[k] != want) {
            char text[512];
            snprintf(text, sizeof text,
                     "%s: page %p word %zu held 0x%016llx, expected 0x%016llx (%s)", what,
                     (const void *)page, k, (unsigned long long)w[k], (unsigned long long)want,
                     zero ? "a hole: zeros" : "data");
            report(text);
            return 0;
        }
    }
    if (slow)
        usleep(300);
    return 1;
}

static int check_region(const char *what, int r, size_t from, size_t to)
{
    for (size_t i = from; i < to; i++) {
        char *p = region[r] + i * PAGE;
        if (!check(what, p, (uintptr_t)p, 0, is_hole(r, i)))
            return 0;
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    slow = argc > 2 && strcmp(argv[2], "slow") == 0;
    snprintf(result_path, sizeof result_path, "%s/result", argv[1]);
    char ready[4096], go[4096];
    snprintf(ready, sizeof ready, "%s/ready", argv[1]);
    snprintf(go, sizeof go, "%s/go", argv[1]);

    /* One reservation with a gap between regions, so no two regions merge into one VMA. */
    size_t total = 0;
    for (int r = 0; r < NREGIONS; r++)
        total += (pages_of[r] + 1) * PAGE;
    char *base = mmap(NULL, total + 4 * PAGE * 64, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED)
        return 4;
    char *at = base;
    volatile uint64_t sink = 0;
    for (int r = 0; r < NREGIONS; r++) {
        region[r] = mmap(at, pages_of[r] * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (region[r] == MAP_FAILED)
            return 4;
        at += (pages_of[r] + 1) * PAGE; /* one PROT_NONE page between regions */
        for (size_t i = 0; i < pages_of[r]; i++) {
            char *p = region[r] + i * PAGE;
            if (r == 1 && i % 11 == 7 && i % 5 != 3)
                sink += *(volatile uint64_t *)p; /* read only: the zero page */
            else if (!is_hole(r, i))
                fill(p, (uintptr_t)p, 0);
        }
    }
    (void)sink;
    /* A split inside region 0: pages [16, 32) read-only, its own VMA. */
    if (mprotect(region[0] + 16 * PAGE, 16 * PAGE, PROT_READ) != 0)
        return 4;
    char *spare = at + PAGE; /* inside the reservation, PROT_NONE: mremap's target */

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
    alarm(120);

    /* Region 0: pages [40, 64) are moved before they are read; the rest read in place. */
    if (!check_region("region 0", 0, 0, 40))
        return 1;
    char *moved = mremap(region[0] + 40 * PAGE, 24 * PAGE, 24 * PAGE,
                         MREMAP_MAYMOVE | MREMAP_FIXED, spare);
    if (moved == MAP_FAILED) {
        report("mremap failed");
        return 1;
    }
    for (size_t i = 0; i < 24; i++)
        if (!check("region 0 moved", moved + i * PAGE, (uintptr_t)(region[0] + (40 + i) * PAGE), 0, 0))
            return 1;
    if (!check_region("region 1", 1, 0, 512))
        return 1;

    /* A fork: the child checks region 2's second half and region 3, which it faults in
     * itself when nobody filled them yet (--no-background), then the parent checks all. */
    pid_t child = fork();
    if (child < 0) {
        report("fork failed");
        return 1;
    }
    if (child == 0) {
        snprintf(result_path, sizeof result_path, "%s/result-child", argv[1]);
        if (!check_region("child: region 2", 2, 1024, 2048) || !check_region("child: region 3", 3, 0, 1))
            _exit(1);
        report("PASS");
        _exit(0);
    }
    int status = 0;
    if (waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        char text[128];
        snprintf(text, sizeof text, "the forked child failed (status 0x%x): see result-child", status);
        report(text);
        return 1;
    }
    if (!check_region("region 2", 2, 0, 2048) || !check_region("region 3", 3, 0, 1))
        return 1;

    /* MADV_DONTNEED: the range reads zeros from then on. */
    if (madvise(region[1] + 100 * PAGE, 50 * PAGE, MADV_DONTNEED) != 0) {
        report("madvise failed");
        return 1;
    }
    for (size_t i = 100; i < 150; i++)
        if (!check("region 1 after MADV_DONTNEED", region[1] + i * PAGE, 0, 0, 1))
            return 1;
    /* munmap, then writes of a new generation, read back. */
    if (munmap(region[2] + 1536 * PAGE, 512 * PAGE) != 0) {
        report("munmap failed");
        return 1;
    }
    for (size_t i = 0; i < 1536; i += 3)
        fill(region[2] + i * PAGE, (uintptr_t)(region[2] + i * PAGE), 1);
    for (size_t i = 0; i < 1536; i++) {
        char *p = region[2] + i * PAGE;
        if (!check("region 2 after writes", p, (uintptr_t)p, i % 3 == 0 ? 1 : 0, 0))
            return 1;
    }
    report("PASS");
    return 0;
}
