"""Firecracker's page-fault handler protocol: serve a VMM's guest memory from a store.

A client (Firecracker restoring a snapshot, or any program in any language) connects to the
Unix socket :func:`serve_socket` listens on and sends its userfaultfd with a JSON array of
regions (:func:`parse_regions` decodes it into :class:`GuestRegion` records); each client is
served by a process of its own until it hangs up. ``uffd serve --socket PATH STORE`` runs it.
"""

from ._socket import GuestRegion as GuestRegion
from ._socket import parse_regions as parse_regions
from ._socket import serve_socket as serve_socket

__all__ = ["GuestRegion", "parse_regions", "serve_socket"]
