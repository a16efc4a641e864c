"""An executable model of the kernel fault path around the seed patch, and an explorer.

The seed ("mm: Don't fault around userfaultfd-registered regions on reads", Nov 2020) closed a
window in which fault-around maps a shmem page that a hole punch is about to drop, after the
punch's pre-unmap wiped the page's uffd-wp bit: a write then lands on the doomed page and the
userfaultfd server never hears of it. The model states the kernel rules involved step by step
(:mod:`._kernel`, on the frozen configuration of :mod:`._config`), builds the seed's scenarios
with them (:mod:`._scenarios`), and lets a small, domain-free explorer (:mod:`._engine`) search
every interleaving under each kernel policy (:data:`PRESETS`). Nothing here touches the live
kernel. The face is :func:`explore`, :func:`replay` and :func:`table` with their result records,
:data:`PRESETS` and :data:`SCENARIOS`, and :class:`Kernel` with the ops its threads run; the
modules behind it are private.

    >>> from userfaultfd import model
    >>> model.explore("wp-punch-hole", "pre-patch").violation.invariant
    'untracked write'
"""

from ._engine import REDUCTIONS as REDUCTIONS
from ._engine import ScheduleError as ScheduleError
from ._explorer import Replay as Replay
from ._explorer import Result as Result
from ._explorer import Violation as Violation
from ._explorer import explore as explore
from ._explorer import replay as replay
from ._explorer import table as table
from ._kernel import Kernel as Kernel
from ._ops import CopyPages as CopyPages
from ._ops import File as File
from ._ops import Protect as Protect
from ._ops import Punch as Punch
from ._ops import Read as Read
from ._ops import Serve as Serve
from ._ops import SigBusError as SigBusError
from ._ops import Vma as Vma
from ._ops import WouldBlock as WouldBlock
from ._ops import Write as Write
from ._ops import WriteBack as WriteBack
from ._ops import WriteProtect as WriteProtect
from ._presets import PRESETS as PRESETS
from ._presets import Preset as Preset
from ._presets import UnknownNameError as UnknownNameError
from ._scenarios import SCENARIOS as SCENARIOS
from ._scenarios import Scenario as Scenario
from ._scenarios import Sizes as Sizes
from ._state import PAGE_SIZE as PAGE_SIZE
from ._state import PTRS_PER_PTE as PTRS_PER_PTE
from ._state import Marker as Marker
from ._state import Present as Present

__all__ = [
    "PAGE_SIZE",
    "PRESETS",
    "PTRS_PER_PTE",
    "REDUCTIONS",
    "SCENARIOS",
    "CopyPages",
    "File",
    "Kernel",
    "Marker",
    "Present",
    "Preset",
    "Protect",
    "Punch",
    "Read",
    "Replay",
    "Result",
    "Scenario",
    "ScheduleError",
    "Serve",
    "SigBusError",
    "Sizes",
    "UnknownNameError",
    "Violation",
    "Vma",
    "WouldBlock",
    "Write",
    "WriteBack",
    "WriteProtect",
    "explore",
    "replay",
    "table",
]
