"""Build hook: compiles the native fast path (userfaultfd/_speedups.c) where a C compiler exists.

The package works without it (runtime/_answer.py falls back to the pure-Python path), so a
failed compile is a warning, never a failed install. ``UFFD_BUILD_NATIVE=0`` skips it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("userfaultfd") / "_speedups.c"


def compile_native(root: Path) -> Path | None:
    """Compile the extension next to its source; its path, or None (with the reason printed)."""
    if os.environ.get("UFFD_BUILD_NATIVE", "1") == "0":
        print(
            "userfaultfd: UFFD_BUILD_NATIVE=0: the native fast path is not built", file=sys.stderr
        )
        return None
    target = root / "userfaultfd" / f"_speedups{sysconfig.get_config_var('EXT_SUFFIX')}"
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    command = [
        *compiler, "-O2", "-Wall", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
        str(root / SOURCE), "-o", str(target), "-lm",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except OSError as err:
        print(f"userfaultfd: no C compiler ({err}): the pure-Python path serves", file=sys.stderr)
        return None
    if done.returncode != 0:
        print(f"userfaultfd: the native fast path did not build; the pure-Python path serves:\n"
              f"{done.stderr[-2000:]}", file=sys.stderr)  # fmt: skip
        return None
    print(f"userfaultfd: built the native fast path ({target.name})", file=sys.stderr)
    return target


class NativeHook(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        built = compile_native(Path(self.root))
        if built is None:
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        if version != "editable":  # an editable install imports it from the source tree
            build_data["force_include"][str(built)] = f"userfaultfd/{built.name}"
