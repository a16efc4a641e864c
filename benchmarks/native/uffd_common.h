/*
 * uffd_common.h: what the two C programs share, so each fault is found the same way.
 *
 * benchmarks/native/fault_bench.c and tests/runtime/c/fc_client.c include it by a path relative
 * to their own file; each is still one translation unit and one gcc command
 * (benchmarks/native/driver.py, tests/runtime/test_socket.py). Define PROGRAM_NAME before
 * including it: die() starts every message with it. Functions are static inline, so a program
 * that does not call one compiles cleanly under -Wall -Wextra -Werror.
 */
#ifndef UFFD_COMMON_H
#define UFFD_COMMON_H

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef PROGRAM_NAME
#error "define PROGRAM_NAME before including uffd_common.h"
#endif

#ifndef MAP_HUGE_SHIFT
#define MAP_HUGE_SHIFT 26 /* include/uapi/asm-generic/hugetlb_encode.h */
#endif
#ifndef MAP_HUGE_2MB
#define MAP_HUGE_2MB (21 << MAP_HUGE_SHIFT) /* include/uapi/asm-generic/hugetlb_encode.h */
#endif

#define HUGE_PAGE 2097152UL

/* A message on stderr, then exit 2: every failing syscall and bad argument ends this way. */
static inline void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));

static inline void die(const char *fmt, ...)
{
	va_list ap;

	fputs(PROGRAM_NAME ": ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(2);
}

static inline void die_errno(const char *what) __attribute__((noreturn));

static inline void die_errno(const char *what)
{
	die("%s: %s", what, strerror(errno));
}

/* pread exactly len bytes of the file `name` at off, or die naming it and the offset. */
static inline void pread_full(int fd, const char *name, void *buf, size_t len, off_t off)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = pread(fd, (char *)buf + done, len - done, off + (off_t)done);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("pread(%s, offset %jd): %s", name, (intmax_t)(off + (off_t)done),
			    strerror(errno));
		}
		if (n == 0)
			die("%s ends at offset %jd", name, (intmax_t)(off + (off_t)done));
		done += (size_t)n;
	}
}

/* size bytes of private anonymous memory, in 2 MiB hugetlb pages when page is HUGE_PAGE. */
static inline void *map_anonymous(size_t size, size_t page)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS;
	void *p;

	if (page == HUGE_PAGE)
		flags |= MAP_HUGETLB | MAP_HUGE_2MB;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, flags, -1, 0);
	if (p == MAP_FAILED) {
		if (page == HUGE_PAGE && errno == ENOMEM)
			die("mmap of %zu bytes with MAP_HUGETLB: ENOMEM: not enough 2 MiB huge pages "
			    "reserved (need %zu free; echo N > /proc/sys/vm/nr_hugepages as root)",
			    size, size / HUGE_PAGE);
		die("mmap(%zu): %s", size, strerror(errno));
	}
	return p;
}

#endif
