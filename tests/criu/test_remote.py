"""A real ``criu dump`` and ``criu restore --lazy-pages`` of tests/criu/target.c whose lazy
pages come from packs (``uffd pack --criu``) on a server: nginx over HTTP and moto's S3
(tests/stores/_servers.py, both on 127.0.0.1). The target checks every page and reports the
first bad one (its address, the word it held and the word expected). A server that goes away
mid-restore must poison the pages it can no longer give (SIGBUS), never serve a wrong one."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stores import _servers

from ._restore import Dumped, Restored, dump, restore, restore_log, wait_for
from .test_lazy_pages import _assert_passed, _pack, _summary

pytestmark = pytest.mark.timeout(240)

#: The bucket and the key prefix the S3 test uploads the packs to.
BUCKET = "criu"


@pytest.fixture
def nginx_root(tmp_path: Path) -> Iterator[tuple[Path, _servers.Nginx]]:
    """An nginx of the test's own (it may kill it) serving ``tmp_path/www``."""
    if not os.path.exists(_servers.NGINX):
        pytest.skip(f"{_servers.NGINX} is missing (Debian package nginx)")
    root = tmp_path / "www"
    root.mkdir()
    with _servers.nginx(root, tmp_path / "nginx") as server:
        yield root, server


def _publish(dumped: Dumped, root: Path) -> Path:
    """The dump's pages packed, then moved under the web root as ``packs/``."""
    packs = _pack(dumped)
    return Path(shutil.move(packs, root / "packs"))


def _page_gets(server: _servers.Nginx) -> list[tuple[str, int, str, int]]:
    return [r for r in server.requests("packs/pages-1.img", settled=False) if r[0] == "GET"]


def test_served_from_a_pack_over_http(
    criu: str, target: str, tmp_path: Path, nginx_root: tuple[Path, _servers.Nginx]
) -> None:
    """``--pages http://.../packs``: every lazy page comes from nginx, by range requests."""
    root, server = nginx_root
    dumped = _dump(criu, target, tmp_path)
    _publish(dumped, root)
    restored = restore(dumped, "--pages", f"{server.url}/packs")
    _assert_passed(restored, dumped)
    counts = _summary(restored)
    assert counts["on_demand"] + counts["background"] >= 2300, restored.summary
    gets = _page_gets(server)
    assert gets, f"nginx saw no GET of packs/pages-1.img: {server.access_log.read_text()}"
    bad = [r for r in gets if r[1] != 206 or r[2] == "-"]
    assert not bad, f"not range requests answered 206: {bad[:5]}"


def test_served_from_a_pack_in_s3(
    criu: str, target: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``--pages s3://criu/packs`` with the endpoint and keys as ``--storage-option``s."""
    pytest.importorskip("moto", reason="the S3 test runs moto's server (PyPI package moto)")
    fsspec = pytest.importorskip("fsspec", reason="s3:// needs fsspec and s3fs")
    pytest.importorskip("s3fs", reason="s3:// needs s3fs")
    dumped = _dump(criu, target, tmp_path)
    packs = _pack(dumped)
    with _servers.moto_server(tmp_path / "moto.log") as endpoint:
        client = {"endpoint_url": endpoint, "region_name": "eu-west-1"}
        options = {"key": "testing", "secret": "testing", "client_kwargs": client}
        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
        fs.mkdir(BUCKET)
        fs.pipe_file(f"{BUCKET}/packs/pages-1.img", (packs / "pages-1.img").read_bytes())
        restored = restore(
            dumped, "--pages", f"s3://{BUCKET}/packs",
            "--storage-option", "key=testing", "--storage-option", "secret=testing",
            "--storage-option", f"client_kwargs.endpoint_url={endpoint}",
            "--storage-option", "client_kwargs.region_name=eu-west-1",
        )  # fmt: skip
        requests = (tmp_path / "moto.log").read_text(errors="replace")
    _assert_passed(restored, dumped)
    assert re.search(r"GET /criu/packs/pages-1\.img", requests), (
        f"moto saw no GET of the pack:\n{requests[-2000:]}"
    )


def test_nginx_killed_mid_restore_poisons_never_wrong(
    criu: str, target: str, tmp_path: Path, nginx_root: tuple[Path, _servers.Nginx]
) -> None:
    """nginx is SIGKILLed once the slow target has faulted its first pages over HTTP (on
    demand only, one page per fault): the pages not fetched yet are poisoned and the target
    dies of SIGBUS at one of them; no page reads wrong and the target never passes."""
    root, server = nginx_root
    dumped = _dump(criu, target, tmp_path, "slow")
    _publish(dumped, root)
    before: list[int] = []

    def kill_after_first_pages() -> None:
        before.append(len(_page_gets(server)))
        wait_for("the target's first faults at nginx",
                 lambda: len(_page_gets(server)) >= before[0] + 3, 30)  # fmt: skip
        server.kill()

    restored = restore(
        dumped, "--pages", f"{server.url}/packs", "--no-background", "--policy", "single",
        "--storage-option", "tries=1", "--storage-option", "timeout=5",
        after_go=kill_after_first_pages,
    )  # fmt: skip
    _assert_killed_served_nothing_wrong(restored, dumped)


def _assert_killed_served_nothing_wrong(restored: Restored, dumped: Dumped) -> None:
    assert restored.restore_status == 0, restore_log(dumped)
    both = f"{restored.result!r} / child {restored.child_result!r}"
    assert "held" not in restored.result + restored.child_result, (
        f"a wrong page after the server died: {both}\ndaemon:\n{restored.daemon_log}"
    )
    assert restored.result != "PASS", (
        f"the target passed although nginx died before its pages were fetched: {restored.summary}"
    )
    assert restored.result.startswith("SIGBUS") or restored.child_result.startswith("SIGBUS"), (
        f"expected SIGBUS at a page nginx could not give, got {both}, ending "
        f"{restored.ending!r}\ndaemon:\n{restored.daemon_log}"
    )
    assert restored.ending == "exit 3", f"the SIGBUS handler exits 3: {restored.ending!r}"
    assert _summary(restored)["poisoned"] > 0, restored.summary
    assert restored.daemon_status == 1, f"a poisoning daemon exits 1: {restored.daemon_status}"


def _dump(criu: str, target: str, tmp_path: Path, *extra: str) -> Dumped:
    work = tmp_path / "work"
    work.mkdir()
    return dump(criu, target, work, *extra)
