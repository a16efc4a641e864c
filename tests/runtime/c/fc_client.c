/*
 * fc_client: plays the Firecracker VMM side of snapshot restore against `uffd serve`.
 *
 * usage: fc_client SOCKET_PATH EXPECTED_FILE SIZE [PAGE_SIZE]
 *
 * 1. mmap SIZE bytes of anonymous private memory (MAP_HUGETLB when PAGE_SIZE is 2097152);
 * 2. userfaultfd(O_CLOEXEC | O_NONBLOCK), UFFDIO_API (features 0), UFFDIO_REGISTER MISSING
 *    over the whole mapping;
 * 3. connect to the Unix stream socket SOCKET_PATH and send ONE message: a JSON array of two
 *    regions, {"base_host_virt_addr", "size", "offset", "page_size"}, the first half of the
 *    mapping at store offset 0 and the second half at store offset SIZE/2, with the uffd attached
 *    as SCM_RIGHTS in the same sendmsg. Region byte i must then come from store byte offset + i,
 *    so mapping byte k must equal EXPECTED_FILE byte k;
 * 4. for every page in order: pread the expected page from EXPECTED_FILE (never through the
 *    mapping), read one byte of the mapped page (this faults, and the server must serve it),
 *    compare that byte, then memcmp the whole page.
 *
 * Prints "OK <pages> pages" and exits 0; on the first difference prints
 * "MISMATCH at offset N ..." and exits 1; exits 2 on a usage or system-call error.
 * alarm(60) kills it (SIGALRM, exit by signal) if a broken server leaves a fault unserved.
 *
 * Like Firecracker, the client keeps its own uffd open after sending it.
 *
 * Only constants present in the 6.1 uapi <linux/userfaultfd.h> are used.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>

#define PROGRAM_NAME "fc_client"
/* die(), pread_full(), map_anonymous(), HUGE_PAGE: shared with the C benchmark. */
#include "../../../benchmarks/native/uffd_common.h"

static size_t parse_size(const char *what, const char *s)
{
	char *end;
	unsigned long long v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v == 0)
		die("%s: expected a positive integer, got '%s'", what, s);
	return (size_t)v;
}

static void send_regions(const char *path, int uffd, uintptr_t base, size_t size, size_t page)
{
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	char json[512];
	size_t half = size / 2;
	int len, sock;

	if (strlen(path) >= sizeof(addr.sun_path))
		die("socket path too long (%zu bytes, at most %zu)", strlen(path),
		    sizeof(addr.sun_path) - 1);
	strcpy(addr.sun_path, path);

	len = snprintf(json, sizeof(json),
		       "[{\"base_host_virt_addr\":%" PRIuPTR ",\"size\":%zu,\"offset\":0,"
		       "\"page_size\":%zu},"
		       "{\"base_host_virt_addr\":%" PRIuPTR ",\"size\":%zu,\"offset\":%zu,"
		       "\"page_size\":%zu}]",
		       base, half, page, base + half, half, half, page);
	if (len < 0 || (size_t)len >= sizeof(json))
		die("region JSON does not fit in %zu bytes", sizeof(json));

	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die("socket(AF_UNIX): %s", strerror(errno));
	if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) != 0)
		die("connect(%s): %s", path, strerror(errno));

	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = {.iov_base = json, .iov_len = (size_t)len};
	struct msghdr msg = {
		.msg_iov = &iov,
		.msg_iovlen = 1,
		.msg_control = control.buf,
		.msg_controllen = sizeof(control.buf),
	};
	struct cmsghdr *cmsg;
	ssize_t sent;

	memset(&control, 0, sizeof(control));
	cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &uffd, sizeof(int));

	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	if (sent < 0)
		die("sendmsg: %s", strerror(errno));
	if (sent != len)
		die("sendmsg: sent %zd of %d bytes", sent, len);
	/* The socket stays open until exit: closing it tells the server we are done. */
}

int main(int argc, char **argv)
{
	if (argc != 4 && argc != 5) {
		fputs("usage: fc_client SOCKET_PATH EXPECTED_FILE SIZE [PAGE_SIZE]\n", stderr);
		return 2;
	}
	alarm(60); /* a server that never serves a fault must not hang us */

	const char *sock_path = argv[1], *expected_path = argv[2];
	size_t size = parse_size("SIZE", argv[3]);
	size_t page = argc == 5 ? parse_size("PAGE_SIZE", argv[4]) : (size_t)sysconf(_SC_PAGESIZE);

	if (page != (size_t)sysconf(_SC_PAGESIZE) && page != HUGE_PAGE)
		die("PAGE_SIZE must be %ld or %lu, got %zu", sysconf(_SC_PAGESIZE), HUGE_PAGE, page);
	if (size % (2 * page) != 0)
		die("SIZE %zu must be a multiple of 2 * PAGE_SIZE (%zu): each half is a region",
		    size, 2 * page);

	int expected = open(expected_path, O_RDONLY | O_CLOEXEC);
	struct stat st;

	if (expected < 0)
		die("open %s: %s", expected_path, strerror(errno));
	if (fstat(expected, &st) != 0)
		die("fstat %s: %s", expected_path, strerror(errno));
	if ((uint64_t)st.st_size < (uint64_t)size)
		die("%s has %jd bytes, fewer than SIZE %zu", expected_path, (intmax_t)st.st_size,
		    size);

	unsigned char *mem = map_anonymous(size, page);

	int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	struct uffdio_api api = {.api = UFFD_API, .features = 0};
	struct uffdio_register reg = {
		.range = {.start = (uintptr_t)mem, .len = size},
		.mode = UFFDIO_REGISTER_MODE_MISSING,
	};

	if (uffd < 0)
		die("userfaultfd(O_CLOEXEC|O_NONBLOCK): %s", strerror(errno));
	if (ioctl(uffd, UFFDIO_API, &api) != 0)
		die("ioctl(UFFDIO_API): %s", strerror(errno));
	if (ioctl(uffd, UFFDIO_REGISTER, &reg) != 0)
		die("ioctl(UFFDIO_REGISTER, MISSING): %s", strerror(errno));

	send_regions(sock_path, uffd, (uintptr_t)mem, size, page);

	unsigned char *want = malloc(page);
	size_t pages = size / page;

	if (want == NULL)
		die("malloc(%zu) failed", page);
	for (size_t i = 0; i < pages; i++) {
		size_t off = i * page;
		unsigned char got;

		pread_full(expected, "EXPECTED_FILE", want, page, (off_t)off);
		got = ((volatile unsigned char *)mem)[off]; /* the fault the server must serve */
		if (got != want[0]) {
			printf("MISMATCH at offset %zu (page %zu): got 0x%02x, expected 0x%02x\n", off,
			       i, got, want[0]);
			return 1;
		}
		if (memcmp(mem + off, want, page) != 0) {
			size_t j = 0;

			while (mem[off + j] == want[j])
				j++;
			printf("MISMATCH at offset %zu (page %zu): got 0x%02x, expected 0x%02x\n",
			       off + j, i, mem[off + j], want[j]);
			return 1;
		}
	}
	printf("OK %zu pages\n", pages);
	return 0;
}
