"""The remote benchmark's rows, its table and its verdicts on the issue's targets."""

from __future__ import annotations

import dataclasses

from _remote_data import PAGE


@dataclasses.dataclass(frozen=True, slots=True)
class Row:
    what: str
    layout: str  # "raw", "pack" or "" (not over the link)
    rtt_ms: float | None
    seconds: float | None  # None: not measured (the reason is in ``note``)
    unit: str  # "MB/s", "pages/s", "ms" or "%"
    value: float | None
    moved: int | None
    faults: int | None
    requests: int | None = None  # HTTP requests nginx answered (its access log)
    touched: int = 0  # bytes the program read (for moved / touched)
    note: str = ""


def format_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _eager_of(rows: list[Row], row: Row) -> Row | None:
    return next((r for r in rows if r.what == "eager GET" and r.layout == "raw"
                 and r.rtt_ms == row.rtt_ms and r.seconds), None)  # fmt: skip


def format_row(row: Row, rows: list[Row] | None = None) -> str:
    what = f"{row.what} ({row.layout})" if row.layout else row.what
    rtt = "-" if row.rtt_ms is None else f"{row.rtt_ms:g} ms"
    if row.value is None:
        return f"{what:40} {rtt:>6}  {row.note}"
    value = f"{row.value:,.1f} {row.unit}"
    if row.unit == "ms" and row.rtt_ms:
        value += f" = {row.value / row.rtt_ms:.1f} RTT"
    eager = _eager_of(rows, row) if rows else None
    ratio = f"{eager.seconds / row.seconds:.2f}x" if eager and eager.seconds and row.seconds else ""
    faults = "-" if row.faults is None else f"{row.faults:,}"
    requests = "-" if row.requests is None else f"{row.requests:,}"
    seconds = "-" if row.seconds is None else f"{row.seconds:.3f}"
    return (f"{what:40} {rtt:>6} {value:>24} {ratio:>8} {format_bytes(row.moved):>9} {faults:>8} "
            f"{requests:>8} {seconds:>8}")  # fmt: skip


def table(rows: list[Row]) -> str:
    lines = [f"{'what':40} {'RTT':>6} {'MB/s, pages/s, ms':>24} {'x eager':>8} {'moved':>9} "
             f"{'faults':>8} {'requests':>8} {'time s':>8}"]  # fmt: skip
    lines += [format_row(row, rows) for row in rows]
    return "\n".join(lines)


def targets(rows: list[Row], rtt: float) -> list[str]:
    """The issue's targets at ``rtt``, each PASS or FAIL from the rows (n/a where unmeasured)."""

    def find(what: str, layout: str = "raw") -> Row | None:
        for r in rows:
            if r.what == what and r.layout == layout and r.rtt_ms in (rtt, None) and r.value:
                return r
        return None

    out: list[str] = []

    def verdict(name: str, ok: bool | None, measured: str) -> None:
        word = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"{word}  {name:66} {measured}")

    eager, seq = find("eager GET"), find("lazy sequential")
    if eager and seq and eager.seconds and seq.seconds:
        ratio = eager.seconds / seq.seconds
        verdict("lazy sequential >= 0.9x eager", ratio >= 0.9, f"{ratio:.2f}x")
    else:
        verdict("lazy sequential >= 0.9x eager", None, "not measured")
    one, four = find("random 1%, 1 thread"), find("random 1%, 4 threads")
    if one and four and one.value and four.value:
        ratio = four.value / one.value
        verdict("random 1%: 4 threads >= 3x one thread", ratio >= 3, f"{ratio:.2f}x")
    else:
        verdict("random 1%: 4 threads >= 3x one thread", None, "not measured")
    demand, replay = find("working set 2%, on demand"), find("working set 2%, replay")
    if demand and replay and demand.seconds and replay.seconds and demand.faults:
        speed = demand.seconds / replay.seconds
        fewer = 1 - (replay.faults or 0) / demand.faults
        measured = f"{speed:.2f}x faster, {fewer:.0%} fewer faults"
        verdict("replay >= 3x faster than on demand, >= 90% fewer faults",
                speed >= 3 and fewer >= 0.9, measured)  # fmt: skip
    else:
        verdict("replay >= 3x faster than on demand, >= 90% fewer faults", None,
                "n/a (record/prefetch not implemented)")  # fmt: skip
    first = find("first byte")
    if first and first.value is not None and rtt:
        rtts = first.value / rtt
        measured = f"{first.value:.1f} ms = {rtts:.1f} RTT"
        local = next((r for r in rows if r.what == "first byte" and r.layout == "raw"
                      and r.rtt_ms == 0 and r.value), None)  # fmt: skip
        if local and local.value:
            measured += f" ({(first.value - local.value) / rtt:.1f} RTT more than at 0 ms)"
        verdict("first byte within 3 RTTs", rtts <= 3, measured)
    else:
        verdict("first byte within 3 RTTs", None, "no RTT to count in" if first else "-")
    raw_random, pack_random = find("random 1%, 1 thread"), find("random 1%, 1 thread", "pack")
    if raw_random and pack_random and raw_random.value and pack_random.value and pack_random.moved:
        speed = pack_random.value / raw_random.value
        over = pack_random.moved / pack_random.touched
        measured = f"{speed:.2f}x raw, {over:.1f}x the bytes touched"
        verdict("pack random 1% >= raw's pages/s, moving <= 10x the bytes touched",
                speed >= 1 and over <= 10, measured)  # fmt: skip
    else:
        verdict("pack random 1% >= raw's pages/s, moving <= 10x the bytes touched", None, "-")
    for how in ("scattered", "in 1 MiB runs"):
        name = f"5%-changed pack uploads <= 10% ({how})"
        changed = find(f"5% changed {how}: upload", "chunks")
        if changed and changed.value is not None:
            verdict(name, changed.value <= 10, f"{changed.value:.1f}% of the first upload")
        else:
            verdict(name, None, "n/a (pack() has no content-addressed layout)")
    name = "5%-changed pack random 1% moves <= 10x the bytes touched"
    changed = find("5% changed scattered: random 1%", "chunks")
    if changed and changed.moved and changed.touched:
        over = changed.moved / changed.touched
        verdict(name, over <= 10, f"{over:.1f}x ({changed.moved // (changed.touched // PAGE):,} "
                f"B a page, {changed.requests} requests)")  # fmt: skip
    else:
        verdict(name, None, "n/a (not measured)")
    return out
