"""The footprint's vocabulary: one record per kind, and the futures speak it as the steps do."""

from __future__ import annotations

import itertools

import pytest

from userfaultfd.model import PRESETS, SCENARIOS, Kernel, _future
from userfaultfd.model import _footprint as fp
from userfaultfd.model._kernel import advance
from userfaultfd.model._state import World

_KEYS: list[fp.Key] = [
    fp.Pte(0, 1),
    fp.Cache(0, 1),
    fp.Frame(1),
    fp.Data(1),
    fp.Page(1),
    fp.ALLOC,
    fp.Inode(0),
    fp.Falloc(0, 1),
    fp.FallocWait(0),
    fp.UFFD,
    fp.Waiters(0, 1),
    fp.Thread("read"),
    fp.Value("read"),
    fp.Snap(0, 1),
    fp.Log(fp.Record.SAVED),
]


def test_every_kind_has_one_record_and_kinds_never_compare_equal() -> None:
    assert sorted(k.kind.value for k in _KEYS) == sorted(kind.value for kind in fp.Kind)
    # Several share their fields (Pte, Cache, Falloc, Waiters, Snap; Frame, Data, Page; Thread,
    # Value): bare tuples of those values would be equal, the kind keeps them apart (mypy too
    # refuses to compare two of them).
    for a, b in itertools.combinations(_KEYS, 2):
        assert a != b, f"{a!r} equals {b!r}"


def _states(k: Kernel, limit: int) -> list[World]:
    """Up to ``limit`` reachable Worlds of a built kernel, depth first in thread order."""
    cfg = k.config
    seen = {k.world.key()}
    todo = [k.world]
    out: list[World] = []
    while todo and len(out) < limit:
        world = todo.pop()
        out.append(world)
        for t in cfg.programs:
            moved = advance(cfg, world, t)
            if moved is not None and moved.state.key() not in seen:
                seen.add(moved.state.key())
                todo.append(moved.state)
    return out


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_step_stays_inside_its_threads_future(scenario: str, preset: str) -> None:
    """What a step notes (frames as their file pages) is inside what ``future`` said the thread
    may touch: a key spelt one way in Step and another in _future would show here. The one
    exception is the mover's own Value key, which no step reads (only invariants watch it)."""
    k = Kernel(preset)
    SCENARIOS[scenario].build(k)
    cfg = k.config
    checked = 0
    for world in _states(k, 300):
        for t in cfg.programs:
            moved = advance(cfg, world, t)
            if moved is None:
                continue
            reads, writes = _future.future(cfg, world, t, frozenset())
            read = _future.abstract(moved.state, moved.reads)
            wrote = _future.abstract(moved.state, moved.writes) - {fp.Value(t)}
            assert read <= reads, f"{t} read {sorted(read - reads, key=repr)} outside its future"
            assert wrote <= writes, f"{t} wrote {sorted(wrote - writes, key=repr)} outside it"
            checked += 1
    assert checked > 0, f"{scenario}: no step was checked"
