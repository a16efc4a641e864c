/* The native fast path: answers page faults from bytes already in this process.
 *
 * An optional twin of the pure-Python path (userfaultfd/runtime/_answer.py says when it is used,
 * and the package works without it). One call reads a batch of uffd messages and answers every
 * fault it can the way the Python handler would: a page already settled gets a WAKE, a missing
 * page gets UFFDIO_COPY of its window straight from a mapping of the store (the faulting page's
 * run first, since COPY wakes the faulting thread), and the map's `settled` bytes and the shared
 * counters are updated. Whatever needs a decision is handed back untouched, in read order, as raw
 * uffd_msg records for the Python loop: any non-fault event (and everything read after it), a
 * fault outside every region, on a page the program dropped, past the store's mapping, or whose
 * COPY met EAGAIN, ESRCH, ENOENT, EFAULT or anything unexpected. So the never-zeros invariant is
 * kept by the same Python code as without this module.
 *
 * Kernel facts it relies on (fs/userfaultfd.c, mm/userfaultfd.c):
 * - UFFDIO_COPY reports EEXIST for its first page only (that page is there: wake it, go on);
 *   EAGAIN while a non-fault event is queued and unread, with `copy` the bytes done.
 * - read() on a uffd returns fault messages before events; a nonblocking uffd answers EAGAIN
 *   when nothing is pending.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <linux/userfaultfd.h>
#include <math.h>
#include <poll.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFDIO_POISON /* Linux 6.6; older headers (Debian 12's) lack it: linux/userfaultfd.h */
struct uffdio_poison {
    struct uffdio_range range;
    __u64 mode;
    __s64 updated;
};
#define _UFFDIO_POISON (0x08)
#define UFFDIO_POISON _IOWR(UFFDIO, _UFFDIO_POISON, struct uffdio_poison)
#endif

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

#define MSG_SIZE ((Py_ssize_t)sizeof(struct uffd_msg))
#define MAX_BATCH 512 /* runtime/_journal.py's MAX_BATCH: the journal holds one read */
#define STREAMS 64
#define HIST_BUCKETS 256

enum { POLICY_SINGLE = 0, POLICY_WINDOW = 1, POLICY_ADAPTIVE = 2 };

typedef struct {
    long long start, next_index, ahead_end, size;
    long long id; /* the stream id kept in this slot, or -1 */
} Stream;

typedef struct {
    uint64_t address, length, offset, page;
    long long stream;
    char *settled, *removed;
    Py_ssize_t pages;
} Region;

typedef struct {
    PyObject_HEAD
    /* Where the store's bytes are mapped: runs of (store offset, length, address) in offset
     * order, address 0 for zeros (Store.mapped()); `zeros` is a read-only zero mapping. */
    uint64_t *seg_offset, *seg_length, *seg_address;
    Py_ssize_t segments;
    char *zeros;
    uint64_t zeros_length;
    uint64_t *counters; /* shared with the program (runtime/_stats.py) */
    /* The journal shared with the supervisor (runtime/_journal.py): the key of the source being
     * read, then the messages of the last read. NULL: read into this call's own buffer. */
    uint64_t *journal;
    int faults, pages, bytes, wakes, copies, zero_pages, hist;
    int policy;
    long long window, min_pages, max_bytes;
    Stream streams[STREAMS];
} Answerer;

static inline void count(Answerer *self, int index, uint64_t amount) {
    __atomic_fetch_add(&self->counters[index], amount, __ATOMIC_RELAXED);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void record_latency(Answerer *self, uint64_t ns) {
    /* The same log-linear histogram as userfaultfd/_counters.py: four buckets per power of 2. */
    int bucket = ns > 0 ? (int)(4.0 * log2((double)ns)) : 0;
    if (bucket > HIST_BUCKETS - 1) bucket = HIST_BUCKETS - 1;
    if (bucket < 0) bucket = 0;
    count(self, self->hist + bucket, 1);
}

static Stream *stream_of(Answerer *self, long long id) {
    Stream *s = &self->streams[(unsigned long long)id % STREAMS];
    if (s->id != id) {
        s->id = id;
        s->start = s->next_index = s->ahead_end = -1;
        s->size = self->min_pages;
    }
    return s;
}

/* The window [*start, *end) for a fault on page `index` (runtime/_policy.py, the same rules). */
static void choose(Answerer *self, Region *r, long long index, long long *start, long long *end) {
    long long pages = (long long)r->pages;
    if (self->policy == POLICY_WINDOW) {
        *start = index - index % self->window;
        *end = *start + self->window;
    } else if (self->policy == POLICY_ADAPTIVE) {
        Stream *s = stream_of(self, r->stream);
        long long ceiling = self->max_bytes / (long long)r->page;
        long long reach = s->next_index > s->ahead_end ? s->next_index : s->ahead_end;
        if (ceiling < self->min_pages) ceiling = self->min_pages;
        if (s->start < index && index <= reach) {
            s->size = s->size * 4 < ceiling ? s->size * 4 : ceiling;
        } else {
            s->size = self->min_pages;
            s->ahead_end = -1;
        }
        *start = index;
        *end = index + s->size < pages ? index + s->size : pages;
        s->start = index;
        s->next_index = *end;
    } else {
        *start = index;
        *end = index + 1;
    }
    if (*start < 0) *start = 0;
    if (*end < index + 1) *end = index + 1;
    if (*end > pages) *end = pages;
}

/* What one COPY came to. */
enum { PLACED = 0, CHANGED = 1, REFER = 2 };

/* Counted before the ioctl (it wakes the faulting thread, which may read the stats), taken
 * back (sign -1) for pages it did not fill: filled from the store, or zeros the store knows. */
static void count_filled(Answerer *self, Region *r, long long pages, int zero, int sign) {
    uint64_t n = (uint64_t)(sign * pages);
    if (zero) {
        count(self, self->zero_pages, n);
    } else {
        count(self, self->pages, n);
        count(self, self->bytes, n * r->page);
    }
}

/* COPY pages [first, last) of `r` from `src` (zeros: a run the store knows is zero), going on
 * past pages that are there already. */
static int place(Answerer *self, int fd, Region *r, long long first, long long last, char *src,
                 int zero) {
    while (first < last) {
        struct uffdio_copy copy;
        uint64_t length = (uint64_t)(last - first) * r->page;
        copy.dst = r->address + (uint64_t)first * r->page;
        copy.src = (uint64_t)(uintptr_t)src;
        copy.len = length;
        copy.mode = 0;
        copy.copy = 0;
        count_filled(self, r, last - first, zero, 1);
        if (ioctl(fd, UFFDIO_COPY, &copy) == 0) {
            memset(r->settled + first, 1, (size_t)(last - first));
            if (!zero) count(self, self->copies, 1);
            return PLACED;
        }
        int err = errno;
        long long done = copy.copy > 0 ? copy.copy / (long long)r->page : 0;
        if (err == EAGAIN) {
            memset(r->settled + first, 1, (size_t)done);
            count_filled(self, r, last - first - done, zero, -1);
            return CHANGED;
        }
        count_filled(self, r, last - first, zero, -1);
        if (err != EEXIST) return REFER; /* ESRCH, ENOENT, EFAULT...: the Python path decides */
        struct uffdio_range wake = {copy.dst, r->page};
        r->settled[first] = 1;
        count(self, self->wakes, 1);
        if (ioctl(fd, UFFDIO_WAKE, &wake) != 0) return REFER;
        first += 1;
        if (!zero) src += r->page;
    }
    return PLACED;
}

/* The run of the store's mapping that holds store offset `offset`, or -1. */
static Py_ssize_t segment_of(Answerer *self, uint64_t offset) {
    Py_ssize_t lo = 0, hi = self->segments;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (self->seg_offset[mid] <= offset) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return -1;
    Py_ssize_t s = lo - 1;
    return offset < self->seg_offset[s] + self->seg_length[s] ? s : -1;
}

/* Fill pages [a, b) of `r` that lie in segment `s` (clipped by the caller). */
static int place_from(Answerer *self, int fd, Region *r, long long a, long long b, Py_ssize_t s) {
    uint64_t offset = r->offset + (uint64_t)a * r->page;
    if (self->seg_address[s] == 0) {
        /* Zeros come from a mapping of zeros_length bytes: never copy past its end (whatever
         * is mapped after it is not zeros). */
        long long most = (long long)(self->zeros_length / r->page);
        for (long long at = a; at < b; at += most) {
            int outcome = place(self, fd, r, at, at + most < b ? at + most : b, self->zeros, 1);
            if (outcome != PLACED) return outcome;
        }
        return PLACED;
    }
    char *src = (char *)(uintptr_t)(self->seg_address[s] + (offset - self->seg_offset[s]));
    return place(self, fd, r, a, b, src, 0);
}

/* The region holding `address`: regions are in address order (RegionTable sorts them). */
static Region *find(Region *regions, Py_ssize_t n, uint64_t address) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (regions[mid].address <= address) lo = mid + 1;
        else hi = mid;
    }
    if (lo == 0) return NULL;
    Region *r = &regions[lo - 1];
    return address < r->address + r->length ? r : NULL;
}

/* Answer one fault; PLACED when it is answered, else the Python path takes it. */
static int answer(Answerer *self, int fd, Region *r, uint64_t address) {
    long long index = (long long)((address - r->address) / r->page);
    /* Counted before the ioctl that wakes the faulting thread (as the Python loop does), and
     * taken back if the Python path is to answer it after all (it counts it again). */
    count(self, self->faults, 1);
    if (r->settled[index]) {
        struct uffdio_range wake = {r->address + (uint64_t)index * r->page, r->page};
        count(self, self->wakes, 1);
        if (ioctl(fd, UFFDIO_WAKE, &wake) == 0) return PLACED;
        count(self, self->wakes, (uint64_t)-1);
        count(self, self->faults, (uint64_t)-1);
        return REFER;
    }
    long long start, end;
    if (r->removed[index]) goto refer; /* zero pages: the Python path */
    /* The window stays inside the run of the mapping that holds the faulting page (a page in
     * no run, or across two, is read by the Python path). */
    uint64_t at = r->offset + (uint64_t)index * r->page;
    Py_ssize_t s = segment_of(self, at);
    if (s < 0 || at + r->page > self->seg_offset[s] + self->seg_length[s]) goto refer;
    choose(self, r, index, &start, &end);
    uint64_t seg_start = self->seg_offset[s], seg_end = seg_start + self->seg_length[s];
    if (r->offset + (uint64_t)start * r->page < seg_start)
        start = index - (long long)((at - seg_start) / r->page);
    long long last_in = index + (long long)((seg_end - at) / r->page);
    if (end > last_in) end = last_in;
    if (self->seg_address[s] == 0 && self->zeros_length < r->page) goto refer; /* 1 GiB pages */
    if (self->seg_address[s] == 0) { /* zeros come from a mapping of zeros_length bytes */
        long long most = (long long)(self->zeros_length / r->page);
        if (start < index - most + 1) start = index - most + 1;
        if (end > index + most) end = index + most;
    } else if ((end - start) * (long long)r->page > 4096) {
        /* Map the source pages of a window with one call, rather than one fault each inside
         * the COPY (which then retries page by page outside the mmap lock). A single page is
         * left to that retry: one syscall fewer per random fault. Linux 5.14+. */
        uintptr_t from = (uintptr_t)(self->seg_address[s] +
                                     (r->offset + (uint64_t)start * r->page - seg_start));
        uintptr_t lo = from & ~(uintptr_t)4095;
        madvise((void *)lo, from - lo + (uint64_t)(end - start) * r->page, MADV_POPULATE_READ);
    }
    long long run_end = index;
    while (run_end < end && !r->settled[run_end] && !r->removed[run_end]) run_end++;
    if (self->seg_address[s] == 0 && run_end - index > (long long)(self->zeros_length / r->page))
        run_end = index + (long long)(self->zeros_length / r->page);
    int outcome = place_from(self, fd, r, index, run_end, s);
    if (outcome != PLACED) goto refer;
    /* The rest of the window; a failure here costs nothing the program waits on. */
    for (long long a = start; a < end;) {
        while (a < end && (r->settled[a] || r->removed[a])) a++;
        long long b = a;
        while (b < end && !r->settled[b] && !r->removed[b]) b++;
        if (a < b && place_from(self, fd, r, a, b, s) != PLACED) break;
        a = b;
    }
    return PLACED;
refer:
    count(self, self->faults, (uint64_t)-1);
    return REFER;
}

/* A source's regions as the native loop reads them, built once per change of the map (the
 * Python RegionMap keeps it until an event changes the map). It holds the `settled` and
 * `removed` bytearrays exported: their length never changes, only their bytes. */
typedef struct {
    PyObject_HEAD
    Region *regions;
    Py_ssize_t count;
    Py_buffer *views;
    Py_ssize_t held;
} RegionTable;

static int by_address(const void *a, const void *b) {
    const Region *x = a, *y = b;
    return x->address < y->address ? -1 : x->address > y->address;
}

static void RegionTable_dealloc(RegionTable *self) {
    for (Py_ssize_t i = 0; i < self->held; i++) PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    PyMem_Free(self->regions);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int RegionTable_init(RegionTable *self, PyObject *args, PyObject *kwds) {
    PyObject *list;
    static char *kwlist[] = {"regions", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!", kwlist, &PyList_Type, &list)) return -1;
    if (self->regions != NULL) {
        PyErr_SetString(PyExc_TypeError, "a RegionTable is built once");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    self->regions = PyMem_Calloc(n > 0 ? n : 1, sizeof(Region));
    self->views = PyMem_Calloc(n > 0 ? 2 * n : 1, sizeof(Py_buffer));
    if (self->regions == NULL || self->views == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    static const char *names[] = {"address", "length", "offset", "page_size", "stream"};
    static const char *maps[] = {"settled", "removed"};
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(list, i);
        uint64_t values[5];
        for (int k = 0; k < 5; k++) {
            PyObject *v = PyObject_GetAttrString(item, names[k]);
            if (v == NULL) return -1;
            values[k] = (uint64_t)PyLong_AsUnsignedLongLong(v);
            Py_DECREF(v);
            if (PyErr_Occurred()) return -1;
        }
        Region *r = &self->regions[i];
        r->address = values[0];
        r->length = values[1];
        r->offset = values[2];
        r->page = values[3];
        r->stream = (long long)values[4];
        if (r->page == 0 || r->length % r->page) {
            PyErr_SetString(PyExc_ValueError, "a region is not a whole number of pages");
            return -1;
        }
        r->pages = (Py_ssize_t)(r->length / r->page);
        for (int k = 0; k < 2; k++) {
            PyObject *v = PyObject_GetAttrString(item, maps[k]);
            if (v == NULL) return -1;
            Py_buffer *view = &self->views[self->held];
            int got = PyObject_GetBuffer(v, view, PyBUF_WRITABLE);
            Py_DECREF(v);
            if (got != 0) return -1;
            self->held++;
            if (view->len < r->pages) {
                PyErr_SetString(PyExc_ValueError, "a region's page map is shorter than it");
                return -1;
            }
            if (k == 0) r->settled = view->buf;
            else r->removed = view->buf;
        }
        self->count = i + 1;
    }
    qsort(self->regions, (size_t)self->count, sizeof(Region), by_address);
    return 0;
}

static PyTypeObject RegionTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfaultfd._speedups.RegionTable",
    .tp_doc = PyDoc_STR("RegionTable(regions): a source's RegionState list, for serve/wait."),
    .tp_basicsize = sizeof(RegionTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RegionTable_init,
    .tp_dealloc = (destructor)RegionTable_dealloc,
};

/* Read and answer batches from `fd` until one needs the Python path or nothing is pending.
 * Returns the messages left (a new bytes object, empty when all were answered), or NULL. */
static PyObject *serve_one(Answerer *self, int fd, RegionTable *table, uint64_t key, int batch) {
    Region *regions = table->regions;
    Py_ssize_t n = table->count;
    struct uffd_msg own[MAX_BATCH];
    struct uffd_msg *msgs = own;
    if (self->journal != NULL) {
        /* Read where the supervisor can find an event if this process dies before its report:
         * the source's key first, then the messages (see _journal.py). */
        __atomic_store_n(&self->journal[0], key, __ATOMIC_RELEASE);
        msgs = (struct uffd_msg *)(self->journal + 1);
    }
    for (int round = 0; round < 8; round++) {
        ssize_t got;
        do {
            got = read(fd, msgs, (size_t)batch * sizeof(struct uffd_msg));
        } while (got < 0 && errno == EINTR);
        if (got < 0) {
            if (errno == EAGAIN) break;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        uint64_t read_at = now_ns();
        int count_read = (int)(got / MSG_SIZE);
        for (int i = 0; i < count_read; i++) {
            struct uffd_msg *m = &msgs[i];
            int outcome = REFER;
            if (m->event == UFFD_EVENT_PAGEFAULT) {
                uint64_t address = m->arg.pagefault.address;
                Region *r = find(regions, n, address);
                if (r != NULL) {
                    /* Several threads on one page: answered once, like the Python loop. */
                    uint64_t page_of = (address - r->address) / r->page;
                    int seen = 0;
                    for (int j = 0; j < i && !seen; j++) {
                        uint64_t other = msgs[j].arg.pagefault.address;
                        seen = other >= r->address && other < r->address + r->length &&
                               (other - r->address) / r->page == page_of;
                    }
                    outcome = seen ? PLACED : answer(self, fd, r, address);
                    if (outcome == PLACED && !seen) record_latency(self, now_ns() - read_at);
                }
            }
            if (outcome != PLACED)
                return PyBytes_FromStringAndSize((const char *)m, (count_read - i) * MSG_SIZE);
        }
        if (count_read < batch) break;
    }
    return PyBytes_FromStringAndSize(NULL, 0);
}

PyDoc_STRVAR(serve_doc,
"serve(fd, table, key, batch) -> bytes\n\n"
"Read batches of up to `batch` messages from the uffd `fd` (nonblocking) and answer the faults\n"
"the store's mapping can answer; `table` is the source's RegionTable (the `settled` bytes of\n"
"its regions are updated). Returns the messages left for the Python path, in read order\n"
"(b\"\" when nothing was pending or everything was answered).");

static PyObject *Answerer_serve(Answerer *self, PyObject *args) {
    int fd, batch;
    RegionTable *table;
    unsigned long long key;
    if (!PyArg_ParseTuple(args, "iO!Ki", &fd, &RegionTableType, &table, &key, &batch))
        return NULL;
    if (batch < 1 || batch > MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "batch must be in [1, %d], not %d", MAX_BATCH, batch);
        return NULL;
    }
    return serve_one(self, fd, table, key, batch);
}


PyDoc_STRVAR(wait_doc,
"wait(sources, others, timeout_ms, batch) -> (list[int], list[tuple[int, bytes]])\n\n"
"Poll the uffds of `sources` (a list of (fd, RegionTable, key)) and the descriptors `others`,\n"
"answering faults as serve() does, until a descriptor of `others` is ready, a uffd has messages\n"
"left for the Python path or reports an error, or `timeout_ms` passes. Returns the ready\n"
"descriptors (of `others`, and any uffd whose poll reported an error) and each uffd's messages\n"
"left. The GIL is released while it polls.");

static PyObject *Answerer_wait(Answerer *self, PyObject *args) {
    PyObject *sources, *others;
    int timeout_ms, batch;
    if (!PyArg_ParseTuple(args, "O!O!ii", &PyList_Type, &sources, &PyList_Type, &others,
                          &timeout_ms, &batch))
        return NULL;
    Py_ssize_t ns = PyList_GET_SIZE(sources), no = PyList_GET_SIZE(others);
    if (batch < 1 || batch > MAX_BATCH) {
        PyErr_Format(PyExc_ValueError, "batch must be in [1, %d], not %d", MAX_BATCH, batch);
        return NULL;
    }
    /* As many sources as the program has live children that share its ranges: no fixed cap. */
    PyObject *ready = NULL, *left = NULL, *result = NULL;
    struct pollfd *fds = PyMem_Calloc((size_t)(ns + no + 1), sizeof(struct pollfd));
    RegionTable **tables = PyMem_Calloc((size_t)(ns + 1), sizeof(RegionTable *));
    unsigned long long *keys = PyMem_Calloc((size_t)(ns + 1), sizeof(unsigned long long));
    if (fds == NULL || tables == NULL || keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < ns; i++) {
        PyObject *entry = PyList_GET_ITEM(sources, i);
        if (!PyArg_ParseTuple(entry, "iO!K", &fds[i].fd, &RegionTableType, &tables[i], &keys[i]))
            goto done;
        fds[i].events = POLLIN;
    }
    for (Py_ssize_t i = 0; i < no; i++) {
        fds[ns + i].fd = (int)PyLong_AsLong(PyList_GET_ITEM(others, i));
        fds[ns + i].events = POLLIN;
        if (PyErr_Occurred()) goto done;
    }
    /* The tables stay alive: `sources` holds them for the whole call. */
    if ((ready = PyList_New(0)) == NULL || (left = PyList_New(0)) == NULL) goto done;
    uint64_t deadline = now_ns() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000000u;
    for (;;) {
        uint64_t now = now_ns();
        int wait_ms = now >= deadline ? 0 : (int)((deadline - now + 999999) / 1000000);
        int got;
        Py_BEGIN_ALLOW_THREADS
        got = poll(fds, (nfds_t)(ns + no), wait_ms);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) goto done;
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            goto done;
        }
        if (got == 0) break;
        for (Py_ssize_t i = 0; i < ns + no; i++) {
            if (!fds[i].revents) continue;
            if (i >= ns || (fds[i].revents & (POLLERR | POLLHUP | POLLNVAL))) {
                PyObject *fd = PyLong_FromLong(fds[i].fd);
                if (fd == NULL || PyList_Append(ready, fd) < 0) {
                    Py_XDECREF(fd);
                    goto done;
                }
                Py_DECREF(fd);
                continue;
            }
            PyObject *rest = serve_one(self, fds[i].fd, tables[i], keys[i], batch);
            if (rest == NULL) goto done;
            if (PyBytes_GET_SIZE(rest) > 0) {
                PyObject *pair = Py_BuildValue("(iN)", fds[i].fd, rest);
                if (pair == NULL || PyList_Append(left, pair) < 0) {
                    Py_XDECREF(pair);
                    goto done;
                }
                Py_DECREF(pair);
            } else {
                Py_DECREF(rest);
            }
        }
        if (PyList_GET_SIZE(ready) || PyList_GET_SIZE(left)) break;
    }
    result = PyTuple_Pack(2, ready, left);
done:
    Py_XDECREF(ready);
    Py_XDECREF(left);
    PyMem_Free(fds);
    PyMem_Free(tables);
    PyMem_Free(keys);
    return result;
}

static int Answerer_init(Answerer *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"segments", "counters", "indices", "policy", "window",
                             "min_pages", "max_bytes", "journal", NULL};
    unsigned long long counters, journal = 0;
    PyObject *segments;
    PyObject *indices;
    long long window = 1, min_pages = 1, max_bytes = 8 << 20;
    int policy;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!KO!i|LLLK", kwlist, &PyList_Type,
                                     &segments, &counters, &PyTuple_Type, &indices, &policy,
                                     &window, &min_pages, &max_bytes, &journal))
        return -1;
    if (!PyArg_ParseTuple(indices, "iiiiiii", &self->faults, &self->pages, &self->bytes,
                          &self->wakes, &self->copies, &self->zero_pages, &self->hist))
        return -1;
    if (policy < POLICY_SINGLE || policy > POLICY_ADAPTIVE || window < 1 || min_pages < 1 ||
        max_bytes < 1) {
        PyErr_SetString(PyExc_ValueError, "unknown policy or a window of less than one page");
        return -1;
    }
    if (self->seg_offset != NULL) {
        PyErr_SetString(PyExc_TypeError, "an Answerer is built once");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(segments);
    self->seg_offset = PyMem_Calloc(n > 0 ? n : 1, sizeof(uint64_t));
    self->seg_length = PyMem_Calloc(n > 0 ? n : 1, sizeof(uint64_t));
    self->seg_address = PyMem_Calloc(n > 0 ? n : 1, sizeof(uint64_t));
    if (!self->seg_offset || !self->seg_length || !self->seg_address) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long o, l, a;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(segments, i), "KKK", &o, &l, &a)) return -1;
        if (i > 0 && o < self->seg_offset[i - 1] + self->seg_length[i - 1]) {
            PyErr_SetString(PyExc_ValueError, "segments overlap or are out of order");
            return -1;
        }
        self->seg_offset[i] = o;
        self->seg_length[i] = l;
        self->seg_address[i] = a;
        self->segments = i + 1;
    }
    /* Zeros to copy from (a COPY of zeros, as the Python path: hugetlbfs has no ZEROPAGE). */
    self->zeros_length = (uint64_t)(max_bytes > (2 << 20) ? max_bytes : (2 << 20));
    void *zeros = mmap(NULL, self->zeros_length, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (zeros == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->zeros = zeros;
    self->counters = (uint64_t *)(uintptr_t)counters;
    self->journal = (uint64_t *)(uintptr_t)journal;
    self->policy = policy;
    self->window = window;
    self->min_pages = min_pages;
    self->max_bytes = max_bytes;
    for (int i = 0; i < STREAMS; i++) self->streams[i].id = -1;
    return 0;
}

static void Answerer_dealloc(Answerer *self) {
    PyMem_Free(self->seg_offset);
    PyMem_Free(self->seg_length);
    PyMem_Free(self->seg_address);
    if (self->zeros != NULL) munmap(self->zeros, self->zeros_length);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Answerer_methods[] = {
    {"serve", (PyCFunction)Answerer_serve, METH_VARARGS, serve_doc},
    {"wait", (PyCFunction)Answerer_wait, METH_VARARGS, wait_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AnswererType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "userfaultfd._speedups.Answerer",
    .tp_doc = PyDoc_STR("Answers faults from a mapping of the store (see the module's text)."),
    .tp_basicsize = sizeof(Answerer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Answerer_init,
    .tp_dealloc = (destructor)Answerer_dealloc,
    .tp_methods = Answerer_methods,
};


/* -- the watchdog (runtime/_export.py): settles the program's pages if both daemons die ------ */

/* The export area's header words (runtime/_export.py), then its records from word 8. */
enum { GENERATION = 0, COUNT = 1, HANDLER_PID = 2, ENDED = 3, SETTLED = 4, RECORDS = 8 };

typedef struct {
    int uffd, pidfd;
    uint64_t *area; /* the supervisor's map (runtime/_export.py), owned by this thread */
    uint64_t area_length;
    uint64_t *fallback; /* the ranges it was started with: (address, length, page) */
    Py_ssize_t nfallback;
    char *zeros;
    uint64_t zeros_length;
} Watch;

static void wait_gone(int pidfd) {
    struct pollfd p = {pidfd, POLLIN, 0};
    while (poll(&p, 1, -1) < 0 && errno == EINTR) {
    }
}

/* Zero pages for a run the program dropped (a COPY of zeros: hugetlbfs has no ZEROPAGE),
 * past pages already there. */
static void zero_run(Watch *w, uint64_t address, uint64_t length, uint64_t page) {
    uint64_t end = address + length;
    while (address < end) {
        uint64_t n = end - address;
        if (n > w->zeros_length) n = w->zeros_length - w->zeros_length % page;
        struct uffdio_copy copy = {address, (uint64_t)(uintptr_t)w->zeros, n, 0, 0};
        if (ioctl(w->uffd, UFFDIO_COPY, &copy) == 0) {
            address += n;
            continue;
        }
        uint64_t done = copy.copy > 0 ? (uint64_t)copy.copy : 0;
        address += done + page; /* EEXIST: that page is there; anything else: skip it */
    }
}

/* Poison every page of [address, address + length) not there yet. A write-protect marker
 * (an out-of-core array's page out of memory: runtime/_pager.py) also answers EEXIST: it is
 * lifted and the page poisoned; a page really there answers EEXIST again and keeps its bytes. */
static void poison_run(Watch *w, uint64_t address, uint64_t length, uint64_t page) {
    uint64_t end = address + length;
    while (address < end) {
        struct uffdio_poison poison = {{address, end - address}, 0, 0};
        if (ioctl(w->uffd, UFFDIO_POISON, &poison) == 0) return;
        int failure = errno;
        address += poison.updated > 0 ? (uint64_t)poison.updated : 0;
        if (address >= end) return;
        if (failure == EEXIST) {
            struct uffdio_writeprotect lift = {{address, page}, 0};
            if (ioctl(w->uffd, UFFDIO_WRITEPROTECT, &lift) == 0) {
                struct uffdio_poison one = {{address, page}, 0, 0};
                (void)ioctl(w->uffd, UFFDIO_POISON, &one);
            }
        }
        address += page; /* that page is settled now, or there, or cannot be: skip it */
    }
}

static void *watch_main(void *arg) {
    Watch *w = arg;
    wait_gone(w->pidfd); /* the supervisor */
    if (!__atomic_load_n(&w->area[ENDED], __ATOMIC_ACQUIRE)) {
        /* An orphaned handler serves alone: wait for it too. */
        pid_t pid = (pid_t)__atomic_load_n(&w->area[HANDLER_PID], __ATOMIC_ACQUIRE);
        int handler = pid > 0 ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;
        if (handler >= 0) {
            wait_gone(handler);
            close(handler);
        }
    }
    if (!__atomic_load_n(&w->area[ENDED], __ATOMIC_ACQUIRE)) {
        uint64_t generation = w->area[GENERATION], count = w->area[COUNT];
        uint64_t most = (w->area_length / 8 - RECORDS) / 4;
        if (generation % 2 == 0 && count <= most) {
            uint64_t *r = w->area + RECORDS;
            for (uint64_t i = 0; i < count; i++, r += 4)
                if (r[3] == 1) zero_run(w, r[0], r[1], r[2]); /* dropped: zeros */
            r = w->area + RECORDS;
            for (uint64_t i = 0; i < count; i++, r += 4)
                if (r[3] == 0) poison_run(w, r[0], r[1], r[2]);
        } else { /* no whole map: the ranges it started with, nothing dropped */
            for (Py_ssize_t i = 0; i < w->nfallback; i++)
                poison_run(w, w->fallback[3 * i], w->fallback[3 * i + 1], w->fallback[3 * i + 2]);
        }
        __atomic_store_n(&w->area[SETTLED], 1, __ATOMIC_RELEASE);
    }
    close(w->uffd); /* the last descriptor: the kernel lets the ranges go, every page settled */
    close(w->pidfd);
    munmap(w->zeros, w->zeros_length);
    munmap(w->area, w->area_length);
    free(w->fallback);
    free(w);
    return NULL;
}

PyDoc_STRVAR(watch_doc,
"watch(uffd, pidfd, area, area_length, ranges) -> None\n\n"
"Start a thread (it needs no GIL) that owns the descriptors `uffd` and `pidfd` (the\n"
"supervisor's) and the export area (runtime/_export.py), waits for the supervisor and then the\n"
"handler the area names to end, and unless the area says they finished, settles the program's\n"
"pages from the map in it (`ranges`, a list of (address, length, page size), when it has no\n"
"whole map): zeros for dropped runs, poison for every other page not there yet. It then marks\n"
"the area settled, closes both descriptors and unmaps the area.");

static PyObject *speedups_watch(PyObject *module, PyObject *args) {
    int uffd, pidfd;
    unsigned long long area, area_length;
    PyObject *ranges;
    (void)module;
    if (!PyArg_ParseTuple(args, "iiKKO!", &uffd, &pidfd, &area, &area_length, &PyList_Type,
                          &ranges))
        return NULL;
    if (area_length < RECORDS * 8) {
        PyErr_SetString(PyExc_ValueError, "the export area is smaller than its header");
        return NULL;
    }
    Watch *w = calloc(1, sizeof(Watch));
    Py_ssize_t n = PyList_GET_SIZE(ranges);
    uint64_t *fallback = calloc((size_t)(3 * n + 1), sizeof(uint64_t));
    if (w == NULL || fallback == NULL) {
        free(w);
        free(fallback);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long a, l, p;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(ranges, i), "KKK", &a, &l, &p)) {
            free(w);
            free(fallback);
            return NULL;
        }
        fallback[3 * i] = a;
        fallback[3 * i + 1] = l;
        fallback[3 * i + 2] = p;
    }
    w->uffd = uffd;
    w->pidfd = pidfd;
    w->area = (uint64_t *)(uintptr_t)area;
    w->area_length = area_length;
    w->fallback = fallback;
    w->nfallback = n;
    w->zeros_length = 2 << 20;
    w->zeros = mmap(NULL, w->zeros_length, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    pthread_t thread;
    pthread_attr_t attr;
    int failed = w->zeros == MAP_FAILED || pthread_attr_init(&attr) != 0;
    if (!failed) {
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        failed = pthread_create(&thread, &attr, watch_main, w) != 0;
        pthread_attr_destroy(&attr);
    }
    if (failed) {
        if (w->zeros != MAP_FAILED) munmap(w->zeros, w->zeros_length);
        free(fallback);
        free(w);
        PyErr_SetString(PyExc_OSError, "the watchdog thread could not start");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"watch", (PyCFunction)speedups_watch, METH_VARARGS, watch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "userfaultfd._speedups",
    "The native fast path of the fault handler (optional; see runtime/_answer.py).", -1,
    module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void) {
    if (PyType_Ready(&AnswererType) < 0 || PyType_Ready(&RegionTableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&AnswererType);
    if (PyModule_AddObject(m, "Answerer", (PyObject *)&AnswererType) < 0) {
        Py_DECREF(&AnswererType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&RegionTableType);
    if (PyModule_AddObject(m, "RegionTable", (PyObject *)&RegionTableType) < 0) {
        Py_DECREF(&RegionTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
