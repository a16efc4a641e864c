"""Linux userfaultfd from Python.

A typed binding of the whole userfaultfd interface (:class:`Userfaultfd`), memory it can
register (:mod:`userfaultfd.memory`), and an executable model of the kernel fault path
(:mod:`userfaultfd.model`).

Faults must be served from another process than the one touching the memory: a Python thread
blocked in a page fault holds the GIL, so a handler thread in the same interpreter never runs.
"""

from ._core import Userfaultfd as Userfaultfd
from ._core import supported_features as supported_features
from ._errors import FeatureUnavailableError as FeatureUnavailableError
from ._errors import MappingChangedError as MappingChangedError
from ._errors import PageExistsError as PageExistsError
from ._errors import ProcessGoneError as ProcessGoneError
from ._errors import UserfaultfdError as UserfaultfdError
from ._errors import UserfaultfdPermissionError as UserfaultfdPermissionError
from ._events import Event as Event
from ._events import Fork as Fork
from ._events import PageFault as PageFault
from ._events import Remap as Remap
from ._events import Remove as Remove
from ._events import Unmap as Unmap
from ._events import parse_events as parse_events
from ._flags import FEATURE_SINCE as FEATURE_SINCE
from ._flags import FaultFlag as FaultFlag
from ._flags import Feature as Feature
from ._flags import Ioctl as Ioctl
from ._flags import Mode as Mode
from ._flags import PageCategory as PageCategory
from ._flags import ScanFlag as ScanFlag

__version__ = "0.1.0"

__all__ = [
    "FEATURE_SINCE",
    "Event",
    "FaultFlag",
    "Feature",
    "FeatureUnavailableError",
    "Fork",
    "Ioctl",
    "MappingChangedError",
    "Mode",
    "PageCategory",
    "PageExistsError",
    "PageFault",
    "ProcessGoneError",
    "Remap",
    "Remove",
    "ScanFlag",
    "Unmap",
    "Userfaultfd",
    "UserfaultfdError",
    "UserfaultfdPermissionError",
    "parse_events",
    "supported_features",
]
