"""Real ``criu dump`` and ``criu restore --lazy-pages`` of tests/criu/target.c, served by
``uffd lazy-pages``. The target checks every page after the restore (words derived from their
address; zeros only in its holes and after MADV_DONTNEED), also after a fork, mremap, munmap
and writes, and reports the first bad page."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._restore import Dumped, Restored, daemon, dump, restore, restore_log

pytestmark = pytest.mark.timeout(240)


def _summary(restored: Restored) -> dict[str, int]:
    numbers = {}
    for name, pattern in (("tasks", r"(\d+) tasks?"), ("on_demand", r"(\d+) pages on demand"),
                          ("background", r"(\d+) in background"),
                          ("zero", r"(\d+) zero pages"), ("poisoned", r"(\d+) POISONED"),
                          ("restarts", r"(\d+) handler restarts")):  # fmt: skip
        match = re.search(pattern, restored.summary)
        numbers[name] = int(match[1]) if match else 0
    return numbers


def _assert_passed(restored: Restored, dumped: Dumped) -> None:
    assert restored.restore_status == 0, (
        f"criu restore failed ({restored.restore_status}):\n{restore_log(dumped)}\n"
        f"daemon:\n{restored.daemon_log}"
    )
    assert restored.result == "PASS", (
        f"the restored target found wrong memory: {restored.result or '(no report)'}; "
        f"its child: {restored.child_result or '(no report)'}; it ended with "
        f"{restored.ending!r}; daemon:\n{restored.daemon_log}"
    )
    assert restored.child_result == "PASS", f"the forked child: {restored.child_result}"
    assert restored.ending == "exit 0", f"the target ended with {restored.ending!r}"
    assert restored.daemon_status == 0, (
        f"uffd lazy-pages exited {restored.daemon_status}:\n{restored.daemon_log}"
    )
    assert restored.summary.startswith("uffd lazy-pages: 1 task,"), restored.summary


def test_lazy_restore_served_from_the_images(criu: str, target: str, tmp_path: Path) -> None:
    dumped = dump(criu, target, tmp_path)
    restored = restore(dumped)
    _assert_passed(restored, dumped)
    counts = _summary(restored)
    # 64 + 512 + 2048 + 1 pages of the target, less region 1's holes, at least.
    assert counts["on_demand"] + counts["background"] >= 2300, restored.summary
    assert counts["poisoned"] == 0, restored.summary


def test_no_background_serves_only_on_demand(criu: str, target: str, tmp_path: Path) -> None:
    dumped = dump(criu, target, tmp_path)
    restored = restore(dumped, "--no-background", "--policy", "window:4")
    _assert_passed(restored, dumped)
    counts = _summary(restored)
    assert counts["background"] == 0, restored.summary
    assert counts["on_demand"] > 0, restored.summary


def test_handler_killed_mid_restore_is_carried(criu: str, target: str, tmp_path: Path) -> None:
    """The handler is SIGKILLed while the slow target faults its pages in: the supervisor
    restarts one, and every page still reads right (a SIGBUS would be allowed, zeros never)."""
    dumped = dump(criu, target, tmp_path, "slow")
    restored = restore(dumped, "--no-background", "--policy", "single",
                       kill_handler_after=0.3)  # fmt: skip
    assert restored.restore_status == 0, restore_log(dumped)
    assert "held" not in restored.result, f"a wrong page after the kill: {restored.result}"
    if restored.result.startswith("SIGBUS"):
        assert _summary(restored)["poisoned"] > 0, restored.summary
    else:
        _assert_passed(restored, dumped)
    assert _summary(restored)["restarts"] >= 1, (
        f"the handler was not restarted: {restored.summary}\n{restored.daemon_log}"
    )


def test_truncated_pages_image_is_refused(criu: str, target: str, tmp_path: Path) -> None:
    """A pages image shorter than the pagemap says: the daemon refuses it before listening,
    naming the file, and the restore fails rather than run the task on wrong pages."""
    dumped = dump(criu, target, tmp_path)
    pages = dumped.images / "pages-1.img"
    with pages.open("r+b") as f:
        f.truncate(pages.stat().st_size - 4096 * 10)
    process, log = daemon(dumped)
    assert process.wait(timeout=30) == 1, log.read_text()
    assert f"{pages}: truncated" in log.read_text(), log.read_text()
    done = subprocess.run([criu, "restore", "-D", str(dumped.images), "--lazy-pages", "-d",
                           "-o", "restore.log"], capture_output=True, timeout=60,
                          check=False)  # fmt: skip
    assert done.returncode != 0, "criu restore succeeded without a lazy-pages daemon"
    (tmp_path / "go").touch()
    time.sleep(0.5)
    assert not (tmp_path / "result").exists(), (tmp_path / "result").read_text()


def _pack(dumped: Dumped) -> Path:
    packs = dumped.work / "packs"
    done = subprocess.run([sys.executable, "-m", "userfaultfd", "pack", "--criu",
                           str(dumped.images), str(packs), "--chunk-size", "64K"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (packs / "pages-1.img").is_file(), done.stdout
    return packs


def test_served_from_a_pack(criu: str, target: str, tmp_path: Path) -> None:
    """``uffd pack --criu`` packs the dump's pages; ``--pages`` serves the lazy ones from it."""
    dumped = dump(criu, target, tmp_path)
    packs = _pack(dumped)
    restored = restore(dumped, "--pages", str(packs))
    _assert_passed(restored, dumped)


def test_corrupt_pack_poisons_never_wrong(criu: str, target: str, tmp_path: Path) -> None:
    """Bytes flipped in the middle of the pack: the pages of that chunk are poisoned (the
    target dies of SIGBUS there), and no page reads wrong."""
    dumped = dump(criu, target, tmp_path)
    packs = _pack(dumped)
    pack = packs / "pages-1.img"
    with pack.open("r+b") as f:
        f.seek(pack.stat().st_size // 2)
        chunk = bytearray(f.read(64))
        f.seek(pack.stat().st_size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))
    restored = restore(dumped, "--pages", str(packs))
    assert restored.restore_status == 0, restore_log(dumped)
    assert "held" not in restored.result + restored.child_result, (
        f"a wrong page from a corrupt pack: {restored.result} {restored.child_result}"
    )
    assert (
        restored.result.startswith("SIGBUS")
        or restored.child_result.startswith("SIGBUS")
        or ("failed" in restored.result)
    ), f"the corrupt chunk was served: {restored.result!r}\n{restored.daemon_log}"
    assert _summary(restored)["poisoned"] > 0, restored.summary
