"""lazy_pages(progress=...): the background fill of a real lazy restore reports how far it is,
in pages of the images' lazy memory, and ends at done == total."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from userfaultfd.criu import CriuPages, Summary, lazy_pages

from ._restore import HERE, dump, restore_log

pytestmark = pytest.mark.timeout(240)


def test_background_fill_reports_progress(criu: str, target: str, tmp_path: Path) -> None:
    dumped = dump(criu, target, tmp_path)
    total = CriuPages(dumped.images, dumped.pid).present_pages()
    calls: list[tuple[int, int]] = []
    outcome: list[Summary | BaseException] = []
    listening = threading.Event()

    def serve() -> None:
        try:
            outcome.append(lazy_pages(
                dumped.images, connect_timeout=60, on_listening=lambda _: listening.set(),
                progress=lambda done, of: calls.append((done, of)),
            ))  # fmt: skip
        except BaseException as err:
            outcome.append(err)
            listening.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert listening.wait(30) and not outcome, f"lazy_pages did not listen: {outcome}"
    reaper = subprocess.Popen(
        [sys.executable, str(HERE / "_reaper.py"), str(dumped.pid), "90", "--", dumped.criu,
         "restore", "-D", str(dumped.images), "--lazy-pages", "-d", "-o", "restore.log"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert reaper.stdout is not None
        first = reaper.stdout.readline().split()
        assert first[1:] == ["0"], f"criu restore failed:\n{restore_log(dumped)}"
        (dumped.work / "go").touch()
        ending = reaper.stdout.readline().strip()
    finally:
        reaper.wait(timeout=100)
    thread.join(90)
    assert not thread.is_alive(), "lazy_pages did not return after the restored target exited"
    assert ending == "exit 0", f"the restored target ended with {ending!r}"
    assert (dumped.work / "result").read_text() == "PASS", "the restored target's memory"
    summary = outcome[0]
    assert isinstance(summary, Summary), summary
    # The target has 64 + 512 + 2048 + 1 pages, less region 1's holes: what the images hold.
    assert total >= 2300, total
    assert calls, "no progress reported for the background fill"
    assert {of for _, of in calls} == {total}, f"totals other than the images' {total} pages"
    dones = [done for done, _ in calls]
    assert dones == sorted(dones), f"progress went backwards: {dones}"
    assert calls[-1] == (total, total), f"the last call is not the end: {calls[-1]}"
    # Every page filled is one the images hold (all of them here, unless the target unmapped
    # some before the fill reached them).
    assert 0 < summary.on_demand + summary.background <= total, summary
