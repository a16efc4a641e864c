"""lazy_tensors() against safetensors' own safe_open, local rows, in one run.

    python3 benchmarks/tensors.py [--size 256M] [--repeat 3] [--dir /var/tmp]

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
local file), a handler (direct=False), a handler with prefetch="all". Remote rows (HTTP and S3
at RTT 0/2/10 ms against an 8-stream ranged download) are not here yet.
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


def layout(size: int, itemsize: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a model of about ``size`` bytes of ``itemsize``-byte elements."""
    per_layer = 4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP + 2 * HIDDEN
    layers = max(1, round((size // itemsize - VOCAB * HIDDEN) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for n in range(layers):
        at = f"model.layers.{n}"
        for part in ("q", "k", "v", "o"):
            shapes[f"{at}.self_attn.{part}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{at}.mlp.gate_proj.weight"] = (MLP, HIDDEN)
        shapes[f"{at}.mlp.up_proj.weight"] = (MLP, HIDDEN)
        shapes[f"{at}.mlp.down_proj.weight"] = (HIDDEN, MLP)
        shapes[f"{at}.input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{at}.post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    return shapes


def write_model(path: str, size: int, dtype: Any) -> int:
    """Write the model (position-dependent values, none zero); its bytes of tensor data."""
    import safetensors.numpy

    arrays = {}
    for seed, (name, shape) in enumerate(layout(size, np.dtype(dtype).itemsize).items()):
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="256M", help="model bytes (K, M, G suffixes)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default="/var/tmp")
    from _plots import add_options  # benchmarks/_plots.py: the figure of the table

    add_options(parser)
    args = parser.parse_args()
    size = int(args.size[:-1]) << {"K": 10, "M": 20, "G": 30}[args.size[-1]] \
        if args.size[-1] in "KMG" else int(args.size)  # fmt: skip
    import ml_dtypes

    began = time.monotonic()
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


if __name__ == "__main__":
    from _plots import main_with_figure

    main_with_figure(main, "tensors")
