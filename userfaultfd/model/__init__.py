"""An executable model of the kernel fault path around the seed patch, and an explorer.

The seed ("mm: Don't fault around userfaultfd-registered regions on reads", Nov 2020) closed a
window in which fault-around maps a shmem page that a hole punch is about to drop, after the
punch's pre-unmap wiped the page's uffd-wp bit: a write then lands on the doomed page and the
userfaultfd server never hears of it. The model states the kernel rules involved step by step
(:mod:`.kernel`), builds the seed's scenarios with them (:mod:`.scenarios`), and lets a small,
domain-free explorer (:mod:`.engine`) search every interleaving under each kernel policy
(:data:`PRESETS`). Nothing here touches the live kernel.

    >>> from userfaultfd import model
    >>> model.explore("wp-punch-hole", "pre-patch").violation.invariant
    'untracked write'
"""

from .engine import REDUCTIONS as REDUCTIONS
from .engine import ScheduleError as ScheduleError
from .explorer import Replay as Replay
from .explorer import Result as Result
from .explorer import TableRow as TableRow
from .explorer import TraceStep as TraceStep
from .explorer import Violation as Violation
from .explorer import build as build
from .explorer import explore as explore
from .explorer import replay as replay
from .explorer import table as table
from .kernel import Kernel as Kernel
from .ops import File as File
from .ops import Label as Label
from .ops import Punch as Punch
from .ops import Read as Read
from .ops import Serve as Serve
from .ops import SigBusError as SigBusError
from .ops import Vma as Vma
from .ops import WouldBlock as WouldBlock
from .ops import Write as Write
from .presets import PRESETS as PRESETS
from .presets import Preset as Preset
from .presets import UnknownNameError as UnknownNameError
from .presets import get_preset as get_preset
from .scenarios import SCENARIOS as SCENARIOS
from .scenarios import Scenario as Scenario
from .scenarios import Sizes as Sizes
from .scenarios import get_scenario as get_scenario
from .state import PAGE_SIZE as PAGE_SIZE
from .state import PTRS_PER_PTE as PTRS_PER_PTE
from .state import Frame as Frame
from .state import Marker as Marker
from .state import Present as Present

__all__ = [
    "PAGE_SIZE",
    "PRESETS",
    "PTRS_PER_PTE",
    "REDUCTIONS",
    "SCENARIOS",
    "File",
    "Frame",
    "Kernel",
    "Label",
    "Marker",
    "Present",
    "Preset",
    "Punch",
    "Read",
    "Replay",
    "Result",
    "Scenario",
    "ScheduleError",
    "Serve",
    "SigBusError",
    "Sizes",
    "TableRow",
    "TraceStep",
    "UnknownNameError",
    "Violation",
    "Vma",
    "WouldBlock",
    "Write",
    "build",
    "explore",
    "get_preset",
    "get_scenario",
    "replay",
    "table",
]
