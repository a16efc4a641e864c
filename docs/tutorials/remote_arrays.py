"""Tutorial: NumPy arrays over HTTP and S3, filled page by page as the program touches them.

Runs as it is (root, Linux): it writes a .npy and a pack of it into a temporary directory,
serves them with a local nginx (Debian package nginx) and a local S3 (moto's server, from the
``test`` extra), and reads them lazily. Point ``URL`` and ``s3_options`` at your own server
and bucket to read real data the same way.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from userfaultfd.runtime import Adaptive, Single, lazy, server_of
from userfaultfd.stores import open_store, pack


# --8<-- [start:servers]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with status {proc.returncode}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@contextlib.contextmanager
def nginx(root: Path) -> Iterator[str]:
    """nginx serving the files of ``root`` (range requests and ETags are nginx's defaults)."""
    port = free_port()
    conf = root.parent / "nginx.conf"
    conf.write_text(
        f"daemon off; master_process off; pid {root.parent}/nginx.pid;"
        f" error_log {root.parent}/error.log;"
        f" events {{}} http {{ access_log off;"
        f" server {{ listen 127.0.0.1:{port}; root {root}; }} }}"
    )
    argv = ["nginx", "-p", str(root.parent), "-c", str(conf), "-e", f"{root.parent}/error.log"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def local_s3() -> Iterator[str]:
    """moto's S3 server on a free port: its endpoint URL."""
    port = free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_listening(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


# --8<-- [end:servers]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "www"
        root.mkdir()
        # --8<-- [start:data]
        # 8 million int64 (64 MiB): element i holds 3 * i + 1, so every page is different
        # and no element is zero: a page filled wrongly (or with zeros) cannot pass the checks.
        n = 8_000_000
        np.save(root / "values.npy", np.arange(n, dtype=np.int64) * 3 + 1)
        info = pack(root / "values.npy", root / "values.pack")  # 64 KiB zstd chunks
        print(f"pack: {info.packed_size:,} bytes for {info.size:,}")
        # --8<-- [end:data]

        with nginx(root) as url:
            # --8<-- [start:http]
            values = lazy(f"{url}/values.npy")  # one ranged GET: size, version, .npy header
            assert values.shape == (n,) and values.dtype == np.int64
            assert values[n - 1] == 3 * (n - 1) + 1  # one fault: the last page
            picks = np.array([0, 12_345, 4_000_000, 7_777_777])
            assert (values[picks] == 3 * picks + 1).all()  # one fault each
            stats = server_of(values).stats()
            print(f"HTTP: {stats.faults} faults, {stats.bytes:,} bytes for 5 elements")
            assert stats.faults == 5, stats
            # --8<-- [end:http]

            # --8<-- [start:scan]
            # A sequential scan: Adaptive (the default) grows its window while faults follow
            # each other, and reads ahead, so 64 MiB take a few dozen faults, not 16,384.
            total = int(values.sum())
            assert total == 3 * (n - 1) * n // 2 + n
            print(f"HTTP scan: {server_of(values).stats().faults} faults in all")
            assert server_of(values).stats().faults < 1_000
            # --8<-- [end:scan]

            # --8<-- [start:pack]
            # The pack: compressed chunks, each checked against its hash on every read.
            # Single(): one page a fault, for a program that jumps around.
            packed = lazy(f"{url}/values.pack", policy=Single())
            assert packed.shape == (n,)
            assert (packed[picks] == 3 * picks + 1).all()
            print(f"HTTP pack: {server_of(packed).stats().bytes:,} bytes filled for 4 elements")
            # --8<-- [end:pack]

        with local_s3() as endpoint:
            # --8<-- [start:s3]
            import fsspec

            s3_options: dict[str, Any] = {
                "key": "testing",
                "secret": "testing",
                "client_kwargs": {"endpoint_url": endpoint, "region_name": "eu-west-1"},
            }
            s3 = fsspec.filesystem("s3", skip_instance_cache=True, **s3_options)
            s3.mkdir("tutorial")
            s3.put_file(str(root / "values.npy"), "tutorial/values.npy")

            store = open_store("s3://tutorial/values.npy", **s3_options)  # pinned to its version
            on_s3 = lazy(store, policy=Adaptive())
            assert (on_s3[picks] == 3 * picks + 1).all()
            assert on_s3[-1] == 3 * (n - 1) + 1
            print(f"S3: {server_of(on_s3).stats().faults} faults for 5 elements")
            store.close()
            # --8<-- [end:s3]
    print("remote arrays: every check passed")


if __name__ == "__main__":
    main()
