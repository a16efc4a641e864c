/*
 * fault_bench: reference measurements of page-fault throughput, in C.
 *
 * Prints ONE line of JSON on stdout, e.g.
 *   {"mode":"uffd","order":"seq","page":4096,"size":1073741824,"pages":262144,
 *    "seconds":1.234,"pages_per_s":212345.6,"faults":262144,"pinned":false,...}
 *
 * Modes (only the loop named here is timed; setup and verification are not):
 *   kernel  anonymous private memory (MAP_HUGETLB for 2 MiB pages); write one byte per page in
 *           the chosen order. The kernel's own demand faults, no userfaultfd.
 *   uffd    the common C design: anonymous memory registered MISSING on a userfaultfd, ONE
 *           handler thread in the same process serving one page per fault: a blocking read(2) of
 *           one uffd_msg, pread(2) of that page from --file into an aligned buffer, UFFDIO_COPY.
 *           The main thread reads one byte per page.
 *   eager   "just read it all": pread the whole file into anonymous memory in 8 MiB chunks.
 *
 * Design notes (facts that shaped the code):
 *   - The uffd is created blocking (O_CLOEXEC only) and the handler sleeps in read(2): that is
 *     one syscall per fault fewer than poll()+read(), and nothing else waits on the fd. poll() on a
 *     blocking uffd would report POLLERR, so we never poll it. The handler is stopped with
 *     pthread_cancel() (read(2) is a cancellation point) once the main thread has touched every
 *     page, and joined.
 *   - CPU placement is explicit in every mode: the main (faulting) thread runs on CPU 0. In uffd
 *     mode the handler runs on CPU 1 by default, so each fault pays a cross-CPU wakeup of the
 *     handler and another one back to the faulting thread (what a separate handler thread costs in
 *     practice); with --pin-same-cpu both run on CPU 0, so the wakeups are same-CPU context
 *     switches. The JSON reports the CPUs used.
 *   - With 4 KiB pages the mapping is madvise(MADV_NOHUGEPAGE)d so transparent huge pages (THP
 *     "always") cannot turn 512 faults into one; 2 MiB pages are hugetlb (MAP_HUGETLB), which must
 *     be reserved beforehand in /proc/sys/vm/nr_hugepages.
 *   - "faults": in uffd mode the number of uffd_msg the handler served; in kernel and eager modes
 *     the process's minor-fault count (getrusage) over the timed loop.
 *   - A sample of pages (every 61st page of the mapping, plus the first and the last) is checked
 *     against the file after the timed loop, in uffd and eager modes: the byte read in the loop
 *     and the first 512 bytes of the page are compared with pread(2) of the file. Exit 1 on a
 *     mismatch.
 *   - Exit 2 on any failing syscall or bad argument, with a message on stderr.
 *
 * Only constants present in the 6.1 uapi header are used (UFFD_API, UFFDIO_API, UFFDIO_REGISTER,
 * UFFDIO_COPY, UFFD_EVENT_PAGEFAULT), so <linux/userfaultfd.h> from linux-libc-dev suffices.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <getopt.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>

#define PROGRAM_NAME "fault_bench"
#include "uffd_common.h" /* die(), pread_full(), map_anonymous(), HUGE_PAGE */

#define SMALL_PAGE 4096UL
#define EAGER_CHUNK (8UL << 20)
#define SAMPLE_STRIDE 61
#define SAMPLE_BYTES 512

enum mode { MODE_KERNEL, MODE_UFFD, MODE_EAGER };

static const char *const mode_names[] = {"kernel", "uffd", "eager"};

struct handler {
	int uffd;
	int file_fd;
	size_t page;
	uintptr_t base;
	unsigned char *buf; /* page-aligned bounce buffer, one page */
	uint64_t served;    /* written only by the handler; read after join */
};

static double now(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
		die_errno("clock_gettime");
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static long minor_faults(void)
{
	struct rusage ru;

	if (getrusage(RUSAGE_SELF, &ru) != 0)
		die_errno("getrusage");
	return ru.ru_minflt;
}

static void pin_self(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof(set), &set) != 0)
		die("sched_setaffinity(CPU %d): %s", cpu, strerror(errno));
}

/* xorshift64* (Vigna); a zero state would stay zero, so seeds are mixed and never zero. */
static uint64_t xorshift64s(uint64_t *state)
{
	uint64_t x = *state;

	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545F4914F6CDD1DULL;
}

static size_t *make_order(size_t pages, int random, uint64_t seed)
{
	size_t *order = malloc(pages * sizeof(*order));
	uint64_t state = seed * 0x9E3779B97F4A7C15ULL + 0x632BE59BD9B4E019ULL;

	if (order == NULL)
		die("malloc(%zu page indexes) failed", pages);
	for (size_t i = 0; i < pages; i++)
		order[i] = i;
	if (!random)
		return order;
	if (state == 0)
		state = 1;
	for (size_t i = pages - 1; i > 0; i--) { /* Fisher-Yates */
		size_t j = (size_t)(xorshift64s(&state) % (uint64_t)(i + 1));
		size_t t = order[i];

		order[i] = order[j];
		order[j] = t;
	}
	return order;
}

static void *map_memory(size_t size, size_t page)
{
	void *p = map_anonymous(size, page);

	if (page == SMALL_PAGE && madvise(p, size, MADV_NOHUGEPAGE) != 0)
		die_errno("madvise(MADV_NOHUGEPAGE)");
	return p;
}

static void *handler_main(void *arg)
{
	struct handler *h = arg;
	struct uffd_msg msg;

	for (;;) {
		ssize_t n = read(h->uffd, &msg, sizeof(msg)); /* blocking; cancellation point */

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die_errno("read(userfaultfd)");
		}
		if ((size_t)n != sizeof(msg))
			die("read(userfaultfd): short read of %zd bytes", n);
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			die("unexpected userfaultfd event 0x%x", msg.event);

		uintptr_t addr = (uintptr_t)msg.arg.pagefault.address & ~(uintptr_t)(h->page - 1);
		struct uffdio_copy copy = {
			.dst = addr,
			.src = (uintptr_t)h->buf,
			.len = h->page,
			.mode = 0,
		};

		pread_full(h->file_fd, "--file", h->buf, h->page, (off_t)(addr - h->base));
		for (;;) {
			copy.copy = 0;
			if (ioctl(h->uffd, UFFDIO_COPY, &copy) == 0)
				break;
			if (errno == EEXIST) /* already populated: nothing to do, the fault retries */
				break;
			if (errno == EAGAIN && copy.copy >= 0) {
				/* partial copy (or a queued non-fault event, which we never enable) */
				copy.dst += (uint64_t)copy.copy;
				copy.src += (uint64_t)copy.copy;
				copy.len -= (uint64_t)copy.copy;
				if (copy.len == 0)
					break;
				continue;
			}
			if (errno == EINTR)
				continue;
			die_errno("ioctl(UFFDIO_COPY)");
		}
		h->served++;
	}
	return NULL;
}

static int open_uffd(void)
{
	/* Blocking fd: the handler sleeps in read(2). See the design notes at the top. */
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
	struct uffdio_api api = {.api = UFFD_API, .features = 0};

	if (fd < 0)
		die_errno("userfaultfd(O_CLOEXEC)");
	if (ioctl(fd, UFFDIO_API, &api) != 0)
		die_errno("ioctl(UFFDIO_API)");
	return fd;
}

static void usage(void)
{
	fputs("usage: fault_bench --mode kernel|uffd|eager [--order seq|random] "
	      "[--page 4096|2097152]\n"
	      "                   [--size BYTES] [--file PATH] [--pin-same-cpu] [--seed N]\n",
	      stderr);
	exit(2);
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno != 0 || end == s || *end != '\0' || s[0] == '-')
		die("%s: not a non-negative integer: '%s'", opt, s);
	return (uint64_t)v;
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{"mode", required_argument, NULL, 'm'},
		{"order", required_argument, NULL, 'o'},
		{"page", required_argument, NULL, 'p'},
		{"size", required_argument, NULL, 's'},
		{"file", required_argument, NULL, 'f'},
		{"pin-same-cpu", no_argument, NULL, 'P'},
		{"seed", required_argument, NULL, 'S'},
		{"help", no_argument, NULL, 'h'},
		{NULL, 0, NULL, 0},
	};
	int mode = -1, is_random = 0, pin_same = 0, c;
	size_t page = SMALL_PAGE, size = 1UL << 30;
	uint64_t seed = 1;
	const char *file = NULL;

	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'm':
			for (int i = 0; i < 3; i++)
				if (strcmp(optarg, mode_names[i]) == 0)
					mode = i;
			if (mode < 0)
				die("--mode: expected kernel, uffd or eager, got '%s'", optarg);
			break;
		case 'o':
			if (strcmp(optarg, "seq") == 0)
				is_random = 0;
			else if (strcmp(optarg, "random") == 0)
				is_random = 1;
			else
				die("--order: expected seq or random, got '%s'", optarg);
			break;
		case 'p':
			page = (size_t)parse_u64("--page", optarg);
			if (page != SMALL_PAGE && page != HUGE_PAGE)
				die("--page: expected 4096 or 2097152, got %zu", page);
			break;
		case 's':
			size = (size_t)parse_u64("--size", optarg);
			break;
		case 'f':
			file = optarg;
			break;
		case 'P':
			pin_same = 1;
			break;
		case 'S':
			seed = parse_u64("--seed", optarg);
			break;
		default:
			usage();
		}
	}
	if (optind != argc || mode < 0)
		usage();
	if (size == 0 || size % page != 0)
		die("--size %zu is not a positive multiple of the page size %zu", size, page);
	if (mode != MODE_KERNEL && file == NULL)
		die("--file is required in %s mode", mode_names[mode]);
	if (pin_same && mode != MODE_UFFD)
		die("--pin-same-cpu applies to uffd mode only");
	if (is_random && mode == MODE_EAGER)
		die("--order random does not apply to eager mode (it reads the file sequentially)");

	size_t pages = size / page;
	int file_fd = -1;

	if (mode != MODE_KERNEL) {
		struct stat st;

		file_fd = open(file, O_RDONLY | O_CLOEXEC);
		if (file_fd < 0)
			die("open %s: %s", file, strerror(errno));
		if (fstat(file_fd, &st) != 0)
			die_errno("fstat");
		if ((uint64_t)st.st_size < (uint64_t)size)
			die("%s has %jd bytes, fewer than --size %zu", file, (intmax_t)st.st_size, size);
	}

	int main_cpu = 0, handler_cpu = -1;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);

	if (mode == MODE_UFFD) {
		handler_cpu = pin_same ? 0 : 1;
		if (handler_cpu >= ncpu)
			die("cross-CPU uffd mode needs 2 online CPUs, have %ld (use --pin-same-cpu)", ncpu);
	}
	pin_self(main_cpu);

	size_t *order = make_order(pages, is_random, seed);
	unsigned char *seen = malloc(pages);

	if (seen == NULL)
		die("malloc(%zu) failed", pages);
	memset(seen, 0, pages); /* fault it in before timing */

	unsigned char *mem = map_memory(size, page);
	struct handler h = {.uffd = -1, .file_fd = file_fd, .page = page, .base = (uintptr_t)mem};
	pthread_t thread;
	double t0, t1;
	long flt0, flt1;
	uint64_t faults;

	switch (mode) {
	case MODE_KERNEL:
		flt0 = minor_faults();
		t0 = now();
		for (size_t i = 0; i < pages; i++)
			((volatile unsigned char *)mem)[order[i] * page] = 1;
		t1 = now();
		flt1 = minor_faults();
		faults = (uint64_t)(flt1 - flt0);
		break;

	case MODE_UFFD: {
		struct uffdio_register reg = {
			.range = {.start = (uintptr_t)mem, .len = size},
			.mode = UFFDIO_REGISTER_MODE_MISSING,
		};
		pthread_attr_t attr;
		cpu_set_t set;
		int err;

		h.uffd = open_uffd();
		if (ioctl(h.uffd, UFFDIO_REGISTER, &reg) != 0)
			die_errno("ioctl(UFFDIO_REGISTER, MISSING)");
		if (!(reg.ioctls & (1ULL << _UFFDIO_COPY)))
			die("UFFDIO_COPY is not available on this range");
		err = posix_memalign((void **)&h.buf, page, page);
		if (err != 0)
			die("posix_memalign(%zu): %s", page, strerror(err));
		memset(h.buf, 0, page);

		CPU_ZERO(&set);
		CPU_SET(handler_cpu, &set);
		if ((err = pthread_attr_init(&attr)) != 0 ||
		    (err = pthread_attr_setaffinity_np(&attr, sizeof(set), &set)) != 0)
			die("pthread_attr_setaffinity_np(CPU %d): %s", handler_cpu, strerror(err));
		if ((err = pthread_create(&thread, &attr, handler_main, &h)) != 0)
			die("pthread_create: %s", strerror(err));
		pthread_attr_destroy(&attr);

		t0 = now();
		for (size_t i = 0; i < pages; i++) {
			size_t idx = order[i];

			seen[idx] = ((volatile unsigned char *)mem)[idx * page];
		}
		t1 = now();

		if ((err = pthread_cancel(thread)) != 0)
			die("pthread_cancel: %s", strerror(err));
		if ((err = pthread_join(thread, NULL)) != 0)
			die("pthread_join: %s", strerror(err));
		faults = h.served;
		break;
	}

	case MODE_EAGER:
	default:
		flt0 = minor_faults();
		t0 = now();
		for (size_t off = 0; off < size; off += EAGER_CHUNK) {
			size_t len = size - off < EAGER_CHUNK ? size - off : EAGER_CHUNK;

			pread_full(file_fd, "--file", mem + off, len, (off_t)off);
		}
		t1 = now();
		flt1 = minor_faults();
		faults = (uint64_t)(flt1 - flt0);
		for (size_t idx = 0; idx < pages; idx++)
			seen[idx] = mem[idx * page];
		break;
	}

	if (mode != MODE_KERNEL) {
		unsigned char expect[SAMPLE_BYTES];

		for (size_t idx = 0; idx < pages; idx++) {
			if (idx % SAMPLE_STRIDE != 0 && idx != pages - 1)
				continue;
			size_t n = page < SAMPLE_BYTES ? page : SAMPLE_BYTES;

			pread_full(file_fd, "--file", expect, n, (off_t)(idx * page));
			if (seen[idx] != expect[0] || memcmp(mem + idx * page, expect, n) != 0) {
				fprintf(stderr,
					"fault_bench: MISMATCH in page %zu (offset %zu): read 0x%02x, "
					"file has 0x%02x\n",
					idx, idx * page, seen[idx], expect[0]);
				return 1;
			}
		}
	}

	double seconds = t1 - t0;
	char handler_cpu_s[16] = "null";

	if (handler_cpu >= 0)
		snprintf(handler_cpu_s, sizeof(handler_cpu_s), "%d", handler_cpu);

	printf("{\"mode\":\"%s\",\"order\":\"%s\",\"page\":%zu,\"size\":%zu,\"pages\":%zu,"
	       "\"seconds\":%.6f,\"pages_per_s\":%.1f,\"faults\":%" PRIu64 ",\"pinned\":%s,"
	       "\"main_cpu\":%d,\"handler_cpu\":%s,\"seed\":%" PRIu64 "}\n",
	       mode_names[mode], is_random ? "random" : "seq", page, size, pages, seconds,
	       (double)pages / seconds, faults, pin_same ? "true" : "false", main_cpu, handler_cpu_s,
	       seed);
	if (fflush(stdout) != 0)
		die_errno("write stdout");
	return 0;
}
