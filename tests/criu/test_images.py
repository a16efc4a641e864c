"""The image reader and CriuPages on images written here (no CRIU needed): what they read,
and the errors they give, naming the file and the record."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from userfaultfd.criu import CriuImageError, CriuPages, Images, pack_images
from userfaultfd.criu import _images as im
from userfaultfd.criu._wire import WireError, decode
from userfaultfd.stores import StoreError

PAGE = 4096
BASE = 0x7F0000000000


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _message(*fields: tuple[int, int | bytes]) -> bytes:
    out = b""
    for number, value in fields:
        if isinstance(value, bytes):
            out += _varint(number << 3 | 2) + _varint(len(value)) + value
        else:
            out += _varint(number << 3) + _varint(value)
    return out


def _image(path: Path, magic: int, *records: bytes, common: bool = True) -> None:
    head = struct.pack("<II", im.IMG_COMMON_MAGIC, magic) if common else struct.pack("<I", magic)
    path.write_bytes(head + b"".join(struct.pack("<I", len(r)) + r for r in records))


def _vma(start: int, end: int, flags: int = im.MAP_PRIVATE | im.MAP_ANONYMOUS) -> bytes:
    return _message((1, start), (2, end), (3, 0), (4, 0), (5, 3), (6, flags),
                    (7, im.VMA_AREA_REGULAR | 1 << 9), (8, 0))  # fmt: skip


def _word_page(address: int) -> bytes:
    return b"".join(struct.pack("<Q", (address + k) * 3 + 1) for k in range(0, PAGE, 8))


def _dump(
    tmp: Path, entries: list[tuple[int, int, int]], *, compat: bool = True, pid: int = 7
) -> Path:
    """Two lazy VMAs, [BASE, BASE+8 pages) and [BASE+8, BASE+16) (an mprotect split), and a
    pagemap of ``entries`` (vaddr, pages, flags); pages-1.img holds each present page's words."""
    _image(tmp / "inventory.img", im.INVENTORY_MAGIC, _message((1, 2)), common=False)
    _image(tmp / "pstree.img", im.PSTREE_MAGIC, _message((1, pid), (2, 0), (3, pid), (4, pid)))
    split = BASE + 8 * PAGE
    mm = _message(*[(n, 0) for n in range(1, 13)], (14, _vma(BASE, split)),
                  (14, _vma(split, split + 8 * PAGE)))  # fmt: skip
    _image(tmp / f"mm-{pid}.img", im.MM_MAGIC, mm)
    count = 2 if compat else 5
    records = [_message((1, 1))] + [_message((1, v), (count, n), (4, f)) for v, n, f in entries]
    _image(tmp / f"pagemap-{pid}.img", im.PAGEMAP_MAGIC, *records)
    data = b"".join(_word_page(v + i * PAGE) for v, n, f in entries if f & im.PE_PRESENT
                    for i in range(n))  # fmt: skip
    (tmp / "pages-1.img").write_bytes(data)
    return tmp


LAZY = im.PE_PRESENT | im.PE_LAZY


@pytest.mark.parametrize("compat", [True, False], ids=["compat_nr_pages", "nr_pages"])
def test_pages_holes_and_a_run_across_vmas(tmp_path: Path, compat: bool) -> None:
    # A run of 4 pages across the split at page 8, a hole at 3..5, a run at 12.
    _dump(tmp_path, [(BASE, 3, LAZY), (BASE + 6 * PAGE, 4, LAZY), (BASE + 12 * PAGE, 1, LAZY)],
          compat=compat)  # fmt: skip
    with CriuPages(tmp_path, 7) as store:
        assert store.size == BASE + 16 * PAGE
        assert [(r.start, r.end) for r in store.lazy_ranges()] == [
            (BASE, BASE + 8 * PAGE), (BASE + 8 * PAGE, BASE + 16 * PAGE)
        ]  # fmt: skip
        buffer = bytearray(16 * PAGE)
        assert store.read_into(BASE, memoryview(buffer)) == len(buffer)
        for i in range(16):
            page = bytes(buffer[i * PAGE : (i + 1) * PAGE])
            present = i < 3 or 6 <= i < 10 or i == 12
            want = _word_page(BASE + i * PAGE) if present else bytes(PAGE)
            assert page == want, f"page {i} at 0x{BASE + i * PAGE:x}: {page[:16].hex()}"
        assert store.known_zero(BASE + 3 * PAGE, 3 * PAGE)
        assert not store.known_zero(BASE + 2 * PAGE, 2 * PAGE)
        with pytest.raises(StoreError, match="in no lazily restored VMA"):
            store.read_into(BASE - PAGE, memoryview(bytearray(PAGE)))


def test_in_parent_is_refused(tmp_path: Path) -> None:
    _dump(tmp_path, [(BASE, 2, LAZY), (BASE + 4 * PAGE, 2, im.PE_PARENT | im.PE_LAZY)])
    with pytest.raises(CriuImageError, match=r"pagemap-7.img: record 2: .*IN_PARENT"):
        CriuPages(tmp_path, 7)


def test_truncated_pages_image_names_the_file(tmp_path: Path) -> None:
    _dump(tmp_path, [(BASE, 4, LAZY)])
    pages = tmp_path / "pages-1.img"
    pages.write_bytes(pages.read_bytes()[: 3 * PAGE])
    with pytest.raises(CriuImageError, match=r"pages-1.img: truncated: .* 16384 bytes"):
        CriuPages(tmp_path, 7)


def test_truncated_record_names_file_and_record(tmp_path: Path) -> None:
    _dump(tmp_path, [(BASE, 1, LAZY), (BASE + 2 * PAGE, 1, LAZY)])
    path = tmp_path / "pagemap-7.img"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CriuImageError, match=r"pagemap-7.img: record 2: truncated"):
        Images(tmp_path).pagemap(7)


def test_bad_magic_and_missing_file(tmp_path: Path) -> None:
    _dump(tmp_path, [(BASE, 1, LAZY)])
    (tmp_path / "pstree.img").write_bytes(struct.pack("<II", im.IMG_COMMON_MAGIC, 0x12345678))
    with pytest.raises(CriuImageError, match=r"pstree.img: magic 0x12345678, expected 0x50273030"):
        Images(tmp_path).pstree()
    with pytest.raises(CriuImageError, match=r"mm-8.img: missing"):
        Images(tmp_path).vmas(8)


def test_wire_errors() -> None:
    assert decode(_message((1, 300), (2, b"ab"))) == {1: [300], 2: [b"ab"]}
    with pytest.raises(WireError, match="runs past the end"):
        decode(b"\x08\x80")
    with pytest.raises(WireError, match="3 bytes announced"):
        decode(b"\x12\x03ab")
    with pytest.raises(WireError, match="wire type 3"):
        decode(b"\x0b")


def _core(tmp: Path, pid: int, state: int) -> None:
    """core-PID.img with a CoreEntry {mtype: X86_64, tc: {task_state, exit_code, ...}}."""
    tc = _message((1, state), (2, 7), (3, 0), (4, 0), (5, 0), (6, b"regions"))
    _image(tmp / f"core-{pid}.img", im.CORE_MAGIC, _message((1, 1), (3, tc)))


def test_a_zombie_is_told_by_its_core_image(tmp_path: Path) -> None:
    """A zombie (TASK_DEAD) has a core image and no memory images; a live task has both. The
    pack of such a tree holds the live task's pages only (it failed on the zombie's pagemap)."""
    _dump(tmp_path, [(BASE, 2, LAZY)])
    pstree = _message((1, 7), (2, 0), (3, 7), (4, 7)), _message((1, 8), (2, 7), (3, 7), (4, 7))
    _image(tmp_path / "pstree.img", im.PSTREE_MAGIC, *pstree)
    _core(tmp_path, 7, im.TASK_ALIVE)
    _core(tmp_path, 8, im.TASK_DEAD)
    images = Images(tmp_path)
    assert [images.task_state(pid) for pid in (7, 8)] == [im.TASK_ALIVE, im.TASK_DEAD]
    assert (images.zombie(7), images.zombie(8)) == (False, True)
    infos = pack_images(tmp_path, tmp_path / "packs")
    assert len(infos) == 1 and (tmp_path / "packs" / "pages-1.img").is_file(), infos


def test_a_core_image_without_its_task_core_is_refused(tmp_path: Path) -> None:
    _image(tmp_path / "core-9.img", im.CORE_MAGIC, _message((1, 1)))
    with pytest.raises(CriuImageError, match=r"core-9.img: record 0: no task core"):
        Images(tmp_path).zombie(9)


def test_without_a_core_image_a_task_is_taken_as_live(tmp_path: Path) -> None:
    _dump(tmp_path, [(BASE, 1, LAZY)])
    assert not Images(tmp_path).zombie(7)
