"""lazy_tensors() against safetensors' own safe_open (local rows), and against downloads of the
file over HTTP and S3 (remote rows, ``--remote``), in one run.

    python3 benchmarks/tensors.py [--size 256M] [--repeat 3] [--dir /var/tmp]
    python3 benchmarks/tensors.py --remote [--size 1G] [--rtt 0,2,10] [--repeat 3]

A synthetic model laid out like a real one (an embedding, N transformer layers of attention
q/k/v/o and MLP gate/up/down matrices, two norms each, a final norm; hidden size 1024), about
``--size`` bytes, written by safetensors.numpy.save_file once in float32 and once in bfloat16.
The file is read into the page cache before every run (see _source.py); each row runs in a
forked child (a fresh program), ``--repeat`` times; the table prints the median, the min and
max, and the speed against safe_open (its median time / the row's: above 1 is faster):
  safe_open: get_tensor            safe_open(path, framework="numpy"), get_tensor of every name
  lazy_tensors ...: copy           lazy_tensors(path, ...), np.array(t) of every tensor (a copy
                                   in memory, as get_tensor gives)
  lazy_tensors ...: touch          the same, reading one byte of every page (the tensors used in
                                   place, as a program that hands them to torch.from_numpy does)
"..." is how the region is mapped: the kernel's own mapping of the file (the default for a
local file), a handler (direct=False), a handler with prefetch="all".

``--remote``: the model in bfloat16 only, served by nginx and by moto's S3 server in a network
namespace behind a delay proxy, at each ``--rtt``; the rows are _tensors_remote.py's (needs
root). Both print a table with ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from _source import warm  # noqa: E402 - benchmarks/_source.py

from userfaultfd._forked import Channel, Forked  # noqa: E402
from userfaultfd.runtime import lazy_tensors  # noqa: E402

HIDDEN = 1024
VOCAB = 16384
MLP = 2816


def layout(size: int, itemsize: int, hidden: int = HIDDEN, vocab: int = VOCAB,
           mlp: int = MLP) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """Tensor shapes of a model of about ``size`` bytes of ``itemsize``-byte elements."""
    per_layer = 4 * hidden * hidden + 3 * hidden * mlp + 2 * hidden
    layers = max(1, round((size // itemsize - vocab * hidden) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for n in range(layers):
        at = f"model.layers.{n}"
        for part in ("q", "k", "v", "o"):
            shapes[f"{at}.self_attn.{part}_proj.weight"] = (hidden, hidden)
        shapes[f"{at}.mlp.gate_proj.weight"] = (mlp, hidden)
        shapes[f"{at}.mlp.up_proj.weight"] = (mlp, hidden)
        shapes[f"{at}.mlp.down_proj.weight"] = (hidden, mlp)
        shapes[f"{at}.input_layernorm.weight"] = (hidden,)
        shapes[f"{at}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    return shapes


def write_model(path: str, size: int, dtype: Any, **dims: int) -> int:
    """Write the model (position-dependent values, none zero); its bytes of tensor data."""
    import safetensors.numpy

    arrays = {}
    for seed, (name, shape) in enumerate(layout(size, np.dtype(dtype).itemsize, **dims).items()):
        count = int(np.prod(shape))
        values = (np.arange(count, dtype=np.float32) % 997 + 1) * (1 + seed % 7)
        arrays[name] = values.astype(dtype).reshape(shape)
    safetensors.numpy.save_file(arrays, path)
    return sum(a.nbytes for a in arrays.values())


def safe_open_all(path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        for name in f.keys():  # noqa: SIM118 - safe_open is no dict
            f.get_tensor(name)


def lazy_all(path: str, copy: bool, **options: Any) -> None:
    tensors = lazy_tensors(path, **options)
    for array in tensors.values():
        if copy:
            np.array(array)
        else:
            array.reshape(-1).view(np.uint8)[::4096].sum()


def timed(body: Callable[[], None]) -> float:
    """Seconds ``body`` takes in a fresh forked child."""

    def run(channel: Channel) -> None:
        start = time.perf_counter()
        body()
        channel.send(time.perf_counter() - start)

    with Forked(run, timeout=600) as child:
        seconds, _ = child.recv(timeout=600)
        assert child.exit_code() == 0
    return float(seconds)


def _size(text: str) -> int:
    """Bytes of "256M", "1G", "4096"."""
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1]] if text[-1] in units else int(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256M", help="model bytes (K, M, G suffixes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--remote", action="store_true",
                        help="the remote rows: HTTP and S3 through a delayed link")  # fmt: skip
    parser.add_argument("--rtt", default="0,2,10", help="remote: round trips in ms")
    parser.add_argument("--s3-size", default="64M", help="remote: the S3 model's bytes (moto"
                        " reads the whole object for every ranged GET)")  # fmt: skip
    parser.add_argument("--deadline", type=float, default=600, help="remote: seconds a row")
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    args = parser.parse_args()
    size = _size(args.size)
    import ml_dtypes

    began = time.monotonic()
    if args.remote:
        return remote_main(size, _size(args.s3_size), [float(r) for r in args.rtt.split(",")],
                           args.repeat, args.deadline, args.dir, began)  # fmt: skip
    print(f"# lazy_tensors vs safe_open, local, a {size >> 20} MiB model in the page cache;"
          f" {args.repeat} runs a row (median, min, max); Linux {platform.release()}"
          f" {platform.machine()}, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'row':46} {'median s':>9} {'min':>7} {'max':>7} {'GB/s':>6} {'vs safe_open':>12}")
    for label, dtype in (("fp32", np.float32), ("bf16", ml_dtypes.bfloat16)):
        path = os.path.join(args.dir, f"uffd-bench-model-{label}.safetensors")
        nbytes = write_model(path, size, dtype)
        rows: list[tuple[str, Callable[[], None]]] = [
            ("safe_open: get_tensor", partial(safe_open_all, path)),
            ("lazy_tensors kernel mapping: copy", partial(lazy_all, path, True)),
            ("lazy_tensors kernel mapping: touch", partial(lazy_all, path, False)),
            ("lazy_tensors handler: copy", partial(lazy_all, path, True, direct=False)),
            ("lazy_tensors handler, prefetch all: copy",
             partial(lazy_all, path, True, prefetch="all")),
        ]  # fmt: skip
        baseline = 0.0
        for name, body in rows:
            times = []
            for _ in range(args.repeat):
                warm(path)
                times.append(timed(body))
            median = statistics.median(times)
            baseline = baseline or median
            print(f"{label + ' ' + name:46} {median:9.3f} {min(times):7.3f} {max(times):7.3f}"
                  f" {nbytes / median / 1e9:6.2f} {baseline / median:11.2f}x")  # fmt: skip
        os.unlink(path)
    print(f"# {time.monotonic() - began:.0f} s")
    return 0


def remote_main(size: int, s3_size: int, rtts: list[float], repeat: int, deadline: float,
                directory: str, began: float) -> int:  # fmt: skip
    """The remote rows (see _tensors_remote.py): a bfloat16 model of about ``size`` bytes over
    HTTP, one of ``s3_size`` over S3 (moto reads a whole object for every ranged GET)."""
    import datetime
    import signal
    import tempfile
    from pathlib import Path

    import ml_dtypes
    from _tensors_remote import STREAMS, measure, read_model, table

    def interrupt(signum: int, frame: Any) -> None:  # unwind: namespaces and servers go
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupt)
    with tempfile.TemporaryDirectory(prefix="uffd-tensors-", dir=directory) as tmp:
        models = {}
        # The S3 model is smaller (moto reads the whole object for every ranged GET), its
        # matrices a quarter as wide, so it has as many tensors as the HTTP one.
        narrow = {"hidden": 256, "vocab": 4096, "mlp": 704}
        for server, nbytes, dims in (("http", size, {}), ("s3", s3_size, narrow)):
            path = Path(tmp) / server / "model.safetensors"
            path.parent.mkdir()
            write_model(str(path), nbytes, ml_dtypes.bfloat16, **dims)
            models[server] = read_model(path)
        results = measure(models, rtts, repeat, deadline)
    when = datetime.datetime.now().astimezone()
    shown = ", ".join(f"{server}: {m.size / 2**20:.0f} MiB ({len(m.tensors)} tensors, header"
                      f" {m.header:,} bytes)" for server, m in models.items())  # fmt: skip
    print(f"# lazy_tensors remote: bf16 models over HTTP (nginx) and S3 (moto) ({shown}); RTT"
          f" {'/'.join(f'{r:g}' for r in rtts)} ms (userspace delay proxy); {STREAMS}-stream"
          f" downloads and long rows once, first tensor best of {repeat}; Linux"
          f" {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs;"
          f" {when:%Y-%m-%d %H:%M %Z}")  # fmt: skip
    print("\n".join(table(results, models)))
    print(f"# {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    from _plots import main_with_figure

    if "--remote" in sys.argv:
        sys.exit(main())  # the figure is the local rows' (_plots.py draws their table)
    main_with_figure(main, "tensors")
