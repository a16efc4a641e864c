"""Coverage-guided fuzzing (atheris, libFuzzer) of the wire decoders, one target per run.

    python3 fuzz/fuzz_decoders.py --target pack -atheris_runs=1000000

Targets: events (parse_events), regions (firecracker.parse_regions), pack (ZstdStore over a pack),
delta (tools.restore over delta files). Each input is used both as raw bytes and, for the
structured targets, as a recipe of mutations applied to a valid message (see ``_mutated``), so
libFuzzer reaches the code behind magic numbers and checksums. Whether a result is right is
decided by the same checks as the bounded Hypothesis run (tests/reliability/test_fuzz.py); a
failed check or any other exception is a crash: libFuzzer stops and writes the input to
``crash-*`` for replay (``python3 fuzz/fuzz_decoders.py --target pack crash-...``).
Arguments after ``--target NAME`` go to libFuzzer (``-max_total_time=60``, a corpus folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["userfaultfd"]):  # every module the checks reach
    import userfaultfd.runtime.firecracker
    import userfaultfd.stores
    import userfaultfd.tools  # noqa: F401 - instrumented here, used through the checks

from tests.reliability import test_fuzz as checks  # after instrumentation


def _edits(fdp: atheris.FuzzedDataProvider, limit: int) -> list[tuple[int, int]]:
    count = fdp.ConsumeIntInRange(0, limit)
    return [
        (fdp.ConsumeIntInRange(0, 1 << 16), fdp.ConsumeIntInRange(0, 255)) for _ in range(count)
    ]


def _resized(fdp: atheris.FuzzedDataProvider, data: bytes) -> bytes:
    resize = fdp.ConsumeIntInRange(-64, 64)
    return data[:resize] if resize < 0 else data + bytes(resize)


def _mutated(fdp: atheris.FuzzedDataProvider, seed: bytes) -> bytes:
    """``seed`` with up to 8 byte edits, then cut or extended by up to 64 bytes."""
    return _resized(fdp, checks.apply_edits(seed, _edits(fdp, 8)))


def events(data: bytes) -> None:
    checks.check_events(data)
    if len(data) >= 32:  # also as whole records, to get past the length check more often
        checks.check_events(data[: len(data) - len(data) % 32])


def regions(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        checks.check_regions(fdp.ConsumeBytes(fdp.remaining_bytes()))
        return
    # A message of 1-3 regions, each field a small signed number times a power of two (or
    # missing, or another JSON type), then mutated as text.
    items: list[dict[str, object]] = []
    for _ in range(fdp.ConsumeIntInRange(1, 3)):
        item: dict[str, object] = {}
        for name in ("base_host_virt_addr", "size", "offset", "page_size"):
            kind = fdp.ConsumeIntInRange(0, 9)
            if kind < 7:
                item[name] = fdp.ConsumeIntInRange(-2, 64) << fdp.ConsumeIntInRange(0, 21)
            elif kind == 7:
                item[name] = fdp.ConsumeUnicode(4)
            elif kind == 8:
                item[name] = fdp.ConsumeFloat()
        items.append(item)
    checks.check_regions(_mutated(fdp, json.dumps(items).encode()))


def pack(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    original, chunk, blob = checks.SEED_PACKS[fdp.ConsumeIntInRange(0, 3)]
    reads = [
        (fdp.ConsumeIntInRange(-2, 13000), fdp.ConsumeIntInRange(0, 5000))
        for _ in range(fdp.ConsumeIntInRange(1, 3))
    ]
    if mode == 0:  # the rest as a pack
        checks.check_pack(fdp.ConsumeBytes(fdp.remaining_bytes()), b"", reads)
    elif mode < 3:  # a valid pack mutated, resealed in mode 2 so the edits pass the footer digest
        mutated = _mutated(fdp, blob)
        checks.check_pack(checks.reseal_pack(mutated) if mode == 2 else mutated, original, reads)
    elif original:  # a consistent pack around one wrong frame: mutated, or declaring a size
        frames, digests = checks.pack_parts(original, chunk)
        i = fdp.ConsumeIntInRange(0, len(frames) - 1)
        if fdp.ConsumeBool():
            frames[i] = _mutated(fdp, frames[i])
        else:
            part = original[i * chunk : (i + 1) * chunk]
            frames[i] = checks.declared_frame(part, fdp.ConsumeIntInRange(0, (1 << 64) - 1))
        checks.check_pack(
            checks.assemble_pack(frames, digests, len(original), chunk), original, reads
        )


def delta(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        checks.check_delta(checks.BASE, [fdp.ConsumeBytes(fdp.remaining_bytes())])
        return
    unit = (checks.PAGE, checks.PAGE // 4, 2 * checks.PAGE, 512)[fdp.ConsumeIntInRange(0, 3)]
    pages = len(checks.BASE) // unit
    indexes = {fdp.ConsumeIntInRange(0, pages - 1) for _ in range(fdp.ConsumeIntInRange(0, 4))}
    seed = checks.encode_delta(unit, len(checks.BASE), {i: bytes([i]) * unit for i in indexes})
    mutated = _mutated(fdp, seed)
    checks.check_delta(checks.BASE, [checks.reseal_delta(mutated) if mode == 2 else mutated])


TARGETS: dict[str, Callable[[bytes], None]] = {
    "events": events,
    "regions": regions,
    "pack": pack,
    "delta": delta,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=sorted(TARGETS), required=True)
    args, libfuzzer_args = parser.parse_known_args()
    atheris.Setup([sys.argv[0], *libfuzzer_args], TARGETS[args.target])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
