"""The supervisor: keeps a handler alive, so a crash costs a restart, never wrong data.

Design note
-----------
- The supervisor holds a descriptor of every uffd the handler serves: the program's (received
  at start) and each forked child's (the handler sends it over SCM_RIGHTS when it reads the FORK
  event). While any descriptor is open the kernel keeps the registration, so a handler that
  dies (a crash, SIGKILL, the OOM killer) leaves the faulting threads blocked, not reading zeros.
  The program itself holds none (see _server).
- It forks a new handler, then wakes every registered range (UFFDIO_WAKE): threads whose fault
  the dead handler had read but not answered fault again, and their events reach the new one.
  The new handler knows nothing of what the dead one filled; copies onto pages already there
  fail with EEXIST, which it answers with a wake.
- Handlers report every change to the ranges (REMAP, REMOVE, UNMAP), every child they adopt and
  every source they close, so a restarted handler starts from where things are now.
- If no handler can run (the store cannot be opened again, or handlers keep dying), or the
  program asks for it (``stop(drain=False)``, or a drain that timed out), the supervisor settles
  every source itself by poisoning what is not filled: SIGBUS, never zeros.
- Supervisor and handler run in a session of their own and ignore the signals a terminal or a
  service manager sends a process group (SIGINT, SIGTERM, SIGHUP, SIGQUIT): the program may
  handle those and go on reading its memory. They end when the processes they serve are gone.
  If the supervisor alone is killed, the handler goes on serving (it holds the uffds), alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, replace

from .._core import Userfaultfd
from .._flags import Feature
from .._forked import Channel
from .._handshake import Ready
from .._ready import readable
from ..stores import Store
from . import _stats
from ._export import ENDED, HANDLER_PID, MapExport
from ._fill import PROGRAM
from ._handler import Handler
from ._journal import Journal
from ._pager import PagerSetup
from ._policy import Policy
from ._ranges import RegionMap, RegionState
from ._reports import Adopted, Changed, Closed, read_table, receive, unpack_ranges
from ._stats import StatsBlock

__all__ = ["Options", "ignore_group_signals", "supervise"]

#: A handler that cannot open its store exits with this status: restarting will not help.
STORE_GONE = 3
#: How long a handler may take to set up before the supervisor goes on without waiting.
_SETUP_TIMEOUT = 30.0
#: More restarts than this within RESTART_WINDOW seconds: give up and poison.
MAX_RESTARTS = 50
RESTART_WINDOW = 10.0

_GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


def ignore_group_signals() -> None:
    for signum in _GROUP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


@dataclass(slots=True)
class _Held:
    """The supervisor's own descriptor of one uffd, and where its ranges are now."""

    uffd: Userfaultfd
    ranges: RegionMap


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """How handlers serve (the supervisor starts each with these, less what only the first
    handler does: a prefetch)."""

    store: Store
    policy: Policy
    stats: StatsBlock
    #: Where the supervisor publishes its map of the program's ranges (the program's watchdog
    #: settles them from it if both daemons die: see _export).
    export: MapExport
    batch: int = 64
    buffer_bytes: int = 8 << 20
    #: Store reads in flight (None: what the store says it serves at once).
    fetches: int | None = None
    #: Where handlers append the working set while the recording goes on (``record`` +
    #: ".partial"), and the file it replaces when the supervisor ends: so a file reused run
    #: after run holds the last run's working set, not every run's.
    record: str | None = None
    record_into: str | None = None
    #: A working set to prefetch (by the first handler only).
    prefetch: str | None = None
    #: An out-of-core array's memfd, budget and page states (see _pager).
    pager: PagerSetup | None = None


def supervise(channel: Channel, control: int, options: Options, cpu: int | None) -> None:
    ignore_group_signals()
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})  # handlers inherit it
    stats = options.stats
    (features, count), fds = channel.recv(timeout=30)  # the uffd, and its table of ranges
    try:
        regions = read_table(fds[1], count)
    finally:
        os.close(fds[1])
    sources = {
        PROGRAM: _Held(
            Userfaultfd.from_fd(fds[0], Feature(features)),
            RegionMap([RegionState(a, n, o, p) for a, n, o, p in regions]),
        )
    }
    options.export.write(sources[PROGRAM].ranges.regions)
    command = b""  # the program's last command, repeated to a restarted handler
    restarts: list[float] = []
    listening = True
    journal = Journal()  # what each handler reads, until it has reported it (see _journal)
    while True:
        pid, commands, reports = _start(sources, options, control, channel, journal)
        if options.prefetch is None:
            stats.set(_stats.PREFETCHING, 0)  # nobody is prefetching: serve() must not wait
        options = replace(options, prefetch=None)  # a restarted handler serves on demand
        stats.set(_stats.HANDLER_PID, pid)
        options.export.set_word(HANDLER_PID, pid)
        if command:
            _tell(commands, command)
        if stats.value(_stats.FLUSH_DONE) < stats.value(_stats.FLUSH_ASKED):
            _tell(commands, b"f")  # a flush the dead handler did not finish
        if channel.sock.fileno() >= 0:
            channel.send(Ready(os.getpid()))
            channel.sock.close()  # the program has what it needs
        ended, listening, received = _watch(
            pid, commands, control, listening, reports, sources, options.export
        )
        _replay(journal, sources)  # what it read and did not live to report
        if PROGRAM in sources:
            options.export.write(sources[PROGRAM].ranges.regions)
        command = received or command
        os.close(commands)
        reports.sock.close()
        if command == b"p" or (ended == 0 and not sources):
            break  # poison asked for, or every source settled or gone
        if ended == 0:
            continue  # exited cleanly with sources left (cannot happen): serve them again
        now = time.monotonic()
        restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
        if ended == STORE_GONE or len(restarts) > MAX_RESTARTS:
            if ended != STORE_GONE:  # (a store that cannot be opened has said why)
                stats.note(f"handlers died {len(restarts)} times in {RESTART_WINDOW:.0f} s: "
                           f"every page not filled is poisoned ({stats.noted()})")  # fmt: skip
            command = b"p"
            break
        stats.add(_stats.RESTARTS)
        for held in sources.values():
            for region in held.ranges.regions:  # faults the dead handler read
                held.uffd.wake(region.address, region.length)
    if command == b"p" and sources:
        _poison(sources, options)
    if options.record is not None and options.record_into is not None:
        with contextlib.suppress(OSError):  # (it was writable at the start: see plan())
            os.replace(options.record, options.record_into)
    options.export.set_word(ENDED, 1)  # finished: the program's watchdog has nothing to settle


def _replay(journal: Journal, sources: dict[int, _Held]) -> None:
    """Apply the changes a dead handler read but may not have reported (twice is harmless)."""
    key, changes = journal.pending()
    if (held := sources.get(key)) is not None:
        for event in changes:
            held.ranges.change(event)
    journal.clear()


def _start(
    sources: dict[int, _Held], options: Options, control: int, channel: Channel,
    journal: Journal,
) -> tuple[int, int, Channel]:  # fmt: skip
    """Fork a handler with descriptors of its own; returns its pid, its command pipe and the
    channel it reports on, once the handler is set up and waits for faults (or has died)."""
    commands_read, commands_write = os.pipe2(os.O_CLOEXEC)
    serving_read, serving_write = os.pipe2(os.O_CLOEXEC)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(commands_write)
            os.close(serving_read)
            ours.close()
            channel.sock.close()
            try:
                opened = options.store.reopen()
            except Exception as err:
                message = f"the store cannot be opened again: {err}"
                options.stats.note(message + "; every page not filled is poisoned")
                print(f"userfaultfd: {message}", file=sys.stderr)
                os._exit(STORE_GONE)
            handler = Handler(
                opened, options.policy, options.stats, batch=options.batch,
                buffer_bytes=options.buffer_bytes, reports=Channel(theirs),
                first_key=max(sources, default=0) + 1, fetches=options.fetches,
                record=options.record, prefetch=options.prefetch, journal=journal,
                export=options.export, pager=options.pager,
            )  # fmt: skip
            for key, held in sources.items():
                own = Userfaultfd.from_fd(os.dup(held.uffd.fileno()), held.uffd.features)
                held.uffd.close()  # the supervisor's copy, inherited: only the supervisor keeps it
                handler.add(own, held.ranges.forgotten(), key=key)
            handler.run(commands_read, control, serving_write)
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(commands_read)
    os.close(serving_write)
    theirs.close()
    # EOF once the handler closes it, about to wait for faults, or dies (then _watch sees it).
    readable([serving_read], _SETUP_TIMEOUT)
    os.close(serving_read)
    return pid, commands_write, Channel(ours)


def _watch(
    pid: int,
    commands: int,
    control: int,
    listening: bool,
    reports: Channel,
    sources: dict[int, _Held],
    export: MapExport,
) -> tuple[int, bool, bytes]:
    """Forward the program's commands and follow the handler's reports until it exits.
    Returns its exit code (-1 for a signal), whether the program's pipe is still open, and
    the command received, if any."""
    received = b""
    # Woken by the handler's exit (its pidfd), not by polling: polling every 20 ms woke every
    # supervisor 50 times a second, and a program with hundreds of arrays has hundreds.
    try:
        exited = os.pidfd_open(pid)
    except ProcessLookupError:  # gone already: waitpid below reaps it
        exited = -1
    try:
        return _follow_until_exit(pid, exited, commands, control, listening, reports, sources,
                                  export, received)  # fmt: skip
    finally:
        if exited >= 0:
            os.close(exited)


def _follow_until_exit(
    pid: int, exited: int, commands: int, control: int, listening: bool, reports: Channel,
    sources: dict[int, _Held], export: MapExport, received: bytes,
) -> tuple[int, bool, bytes]:  # fmt: skip
    while True:
        watched = [reports.sock.fileno(), control] if listening else [reports.sock.fileno()]
        if exited >= 0:
            watched.append(exited)
        ready = readable(watched, 1.0 if exited >= 0 else 0.02)
        if reports.sock.fileno() in ready:
            _follow(reports, sources, export)
        if control in ready:
            command = os.read(control, 1)
            if not command:
                listening = False  # the program closed its end: nothing more will come
            elif command == b"p":  # poison: this process does it, the handler may be stuck
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                _follow(reports, sources, export)
                return -1, listening, command
            else:
                if command != b"f":  # (a flush is repeated only while unfinished: see supervise)
                    received = command
                _tell(commands, command)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            _follow(reports, sources, export)  # what it said before it went
            code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
            return code, listening, received


def _follow(reports: Channel, sources: dict[int, _Held], export: MapExport) -> None:
    """Apply every report waiting on the channel (and publish the program's map if it changed)."""
    changed = False
    while readable([reports.sock.fileno()], 0):
        try:
            report, fds = receive(reports, timeout=0)
        except (EOFError, OSError):
            break
        if isinstance(report, Changed) and report.key in sources:
            sources[report.key].ranges.change(report.event)
            changed = changed or report.key == PROGRAM
        elif isinstance(report, Adopted) and fds and report.parent in sources:
            parent = sources[report.parent]
            sources[report.key] = _Held(
                Userfaultfd.from_fd(fds[0], parent.uffd.features),
                RegionMap(unpack_ranges(report.ranges)),
            )
        elif isinstance(report, Closed) and report.key in sources:
            sources.pop(report.key).uffd.close()
        for extra in fds[1:] if isinstance(report, Adopted) else fds:
            os.close(extra)
    if changed and PROGRAM in sources:
        export.write(sources[PROGRAM].ranges.regions)


def _tell(commands: int, command: bytes) -> None:
    with contextlib.suppress(BrokenPipeError):
        os.write(commands, command)


def _poison(sources: dict[int, _Held], options: Options) -> None:
    """Settle every source by poisoning the pages not filled: SIGBUS on access, not zeros."""
    page = max((r.page_size for h in sources.values() for r in h.ranges.regions), default=4096)
    # An out-of-core array's dirty pages go back first, through the supervisor's own store.
    settler = Handler(None, options.policy, options.stats, buffer_bytes=page,
                      pager=options.pager, pager_store=options.store)  # fmt: skip
    for key, held in sources.items():
        settler.add(held.uffd, held.ranges.forgotten(), key=key)
    sources.clear()
    settler.finish(fill=False)
