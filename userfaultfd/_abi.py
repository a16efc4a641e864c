"""Constants and struct layouts of the userfaultfd ABI. No logic.

Mirrors include/uapi/linux/userfaultfd.h (Linux 6.8), the PAGEMAP_SCAN part of
include/uapi/linux/fs.h (6.7) and include/uapi/asm-generic/ioctl.h for the ioctl encoding, which
x86-64 and arm64 share. Every struct is declared once as a ``struct.Struct`` and its size is
checked against the kernel's at import.
"""

from __future__ import annotations

import platform
import struct

# -- asm-generic/ioctl.h ---------------------------------------------------------------------------
_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, kind: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(kind: int, nr: int) -> int:
    return _IOC(_IOC_NONE, kind, nr, 0)


def _IOR(kind: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ, kind, nr, size)


def _IOWR(kind: int, nr: int, size: int) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, kind, nr, size)


# -- the userfaultfd(2) system call ----------------------------------------------------------------
#: arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h (arm64).
SYSCALL_NUMBERS = {"x86_64": 323, "aarch64": 282, "arm64": 282}
SYS_userfaultfd: int | None = SYSCALL_NUMBERS.get(platform.machine())
UFFD_USER_MODE_ONLY = 1
#: O_CLOEXEC and O_NONBLOCK as the syscall takes them (asm-generic/fcntl.h, x86-64 and arm64).
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000

#: /dev/userfaultfd (Linux 6.1): USERFAULTFD_IOC_NEW takes the syscall's flags, returns a uffd.
DEVICE_PATH = "/dev/userfaultfd"
USERFAULTFD_IOC = 0xAA
USERFAULTFD_IOC_NEW = _IO(USERFAULTFD_IOC, 0x00)

# -- API version, ioctl numbers --------------------------------------------------------------------
UFFD_API = 0xAA
UFFDIO = 0xAA
NR_REGISTER = 0x00
NR_UNREGISTER = 0x01
NR_WAKE = 0x02
NR_COPY = 0x03
NR_ZEROPAGE = 0x04
NR_MOVE = 0x05
NR_WRITEPROTECT = 0x06
NR_CONTINUE = 0x07
NR_POISON = 0x08
NR_API = 0x3F

# -- structs ---------------------------------------------------------------------------------------
#: struct uffd_msg: u8 event, u8 reserved1, u16 reserved2, u32 reserved3, 24-byte union (packed).
UFFD_MSG = struct.Struct("=BBHI24s")
#: union arm pagefault: u64 flags, u64 address, u32 ptid (then 4 bytes of padding).
MSG_PAGEFAULT = struct.Struct("=QQI4x")
#: union arm fork: u32 ufd.
MSG_FORK = struct.Struct("=I20x")
#: union arm remap: u64 from, u64 to, u64 len.
MSG_REMAP = struct.Struct("=QQQ")
#: union arm remove (also unmap): u64 start, u64 end.
MSG_REMOVE = struct.Struct("=QQ8x")

#: struct uffdio_api: u64 api, u64 features, u64 ioctls.
UFFDIO_API_STRUCT = struct.Struct("=QQQ")
#: struct uffdio_range: u64 start, u64 len.
UFFDIO_RANGE = struct.Struct("=QQ")
#: struct uffdio_register: range, u64 mode, u64 ioctls (out).
UFFDIO_REGISTER_STRUCT = struct.Struct("=QQQQ")
#: struct uffdio_copy: u64 dst, u64 src, u64 len, u64 mode, s64 copy (out).
UFFDIO_COPY_STRUCT = struct.Struct("=QQQQq")
#: struct uffdio_zeropage: range, u64 mode, s64 zeropage (out).
UFFDIO_ZEROPAGE_STRUCT = struct.Struct("=QQQq")
#: struct uffdio_writeprotect: range, u64 mode.
UFFDIO_WRITEPROTECT_STRUCT = struct.Struct("=QQQ")
#: struct uffdio_continue: range, u64 mode, s64 mapped (out).
UFFDIO_CONTINUE_STRUCT = struct.Struct("=QQQq")
#: struct uffdio_poison: range, u64 mode, s64 updated (out).
UFFDIO_POISON_STRUCT = struct.Struct("=QQQq")
#: struct uffdio_move: u64 dst, u64 src, u64 len, u64 mode, s64 move (out).
UFFDIO_MOVE_STRUCT = struct.Struct("=QQQQq")

UFFDIO_API = _IOWR(UFFDIO, NR_API, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER = _IOWR(UFFDIO, NR_REGISTER, UFFDIO_REGISTER_STRUCT.size)
UFFDIO_UNREGISTER = _IOR(UFFDIO, NR_UNREGISTER, UFFDIO_RANGE.size)
UFFDIO_WAKE = _IOR(UFFDIO, NR_WAKE, UFFDIO_RANGE.size)
UFFDIO_COPY = _IOWR(UFFDIO, NR_COPY, UFFDIO_COPY_STRUCT.size)
UFFDIO_ZEROPAGE = _IOWR(UFFDIO, NR_ZEROPAGE, UFFDIO_ZEROPAGE_STRUCT.size)
UFFDIO_MOVE = _IOWR(UFFDIO, NR_MOVE, UFFDIO_MOVE_STRUCT.size)
UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, NR_WRITEPROTECT, UFFDIO_WRITEPROTECT_STRUCT.size)
UFFDIO_CONTINUE = _IOWR(UFFDIO, NR_CONTINUE, UFFDIO_CONTINUE_STRUCT.size)
UFFDIO_POISON = _IOWR(UFFDIO, NR_POISON, UFFDIO_POISON_STRUCT.size)

# -- events and their flags ------------------------------------------------------------------------
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2

# -- modes -----------------------------------------------------------------------------------------
UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2
UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1
UFFDIO_CONTINUE_MODE_DONTWAKE = 1 << 0
UFFDIO_CONTINUE_MODE_WP = 1 << 1
UFFDIO_POISON_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_DONTWAKE = 1 << 0
UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES = 1 << 1

# -- PAGEMAP_SCAN (include/uapi/linux/fs.h) --------------------------------------------------------
#: struct pm_scan_arg: size, flags, start, end, walk_end, vec, vec_len, max_pages,
#: category_inverted, category_mask, category_anyof_mask, return_mask (all u64).
PM_SCAN_ARG = struct.Struct("=12Q")
#: struct page_region: u64 start, u64 end, u64 categories.
PAGE_REGION = struct.Struct("=QQQ")
PAGEMAP_SCAN = _IOWR(ord("f"), 16, PM_SCAN_ARG.size)
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7

# -- /proc/PID/pagemap (Documentation/admin-guide/mm/pagemap.rst) ---------------------------------
PAGEMAP_ENTRY = struct.Struct("=Q")
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62
PM_FILE_OR_SHARED = 1 << 61
PM_UFFD_WP = 1 << 57

# -- memory: mman-common.h, memfd.h, falloc.h (x86-64 and arm64 agree) ----------------------------
MAP_HUGETLB = 0x40000
MAP_NORESERVE = 0x4000  # asm-generic/mman.h: do not reserve swap or commit charge
MADV_DONTFORK = 10  # mman-common.h: the mapping is not copied into a child at fork
MADV_DOFORK = 11  # mman-common.h: undo MADV_DONTFORK
MFD_CLOEXEC = 0x0001
MFD_HUGETLB = 0x0004
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

# Sizes the kernel's structs have; a mismatch here is a bug in a layout above.
assert UFFD_MSG.size == 32
assert MSG_PAGEFAULT.size == MSG_FORK.size == MSG_REMAP.size == MSG_REMOVE.size == 24
assert UFFDIO_API_STRUCT.size == 24
assert UFFDIO_RANGE.size == 16
assert UFFDIO_REGISTER_STRUCT.size == 32
assert UFFDIO_COPY_STRUCT.size == UFFDIO_MOVE_STRUCT.size == 40
assert UFFDIO_ZEROPAGE_STRUCT.size == UFFDIO_CONTINUE_STRUCT.size == UFFDIO_POISON_STRUCT.size == 32
assert UFFDIO_WRITEPROTECT_STRUCT.size == 24
assert PM_SCAN_ARG.size == 96
assert PAGE_REGION.size == 24
assert UFFDIO_REGISTER == 0xC020AA00 and UFFDIO_API == 0xC018AA3F and PAGEMAP_SCAN == 0xC0606610
