"""Which memory controller can limit workers here: cgroup2's, cgroup v1's, or none and why.

Asked when a sandbox plan is made (``--check-config`` and the daemon alike):
reads of /proc and cgroupfs only, no trio. Setting the limits is the daemon's
(ipad/daemon/memory_cgroup.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs


@attrs.frozen
class MemorySupport:
    """Where worker memory limits can be set, or why they cannot."""

    #: 2 or 1, or None when there is no usable memory controller.
    version: int | None
    #: The v1 memory cgroup the daemon is in (version 1 only).
    v1_parent: Path | None = None
    reason: str = ""


def _mountinfo() -> list[list[str]]:
    try:
        return [line.split() for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    except OSError:
        return []


def _own_cgroups() -> dict[str, str]:
    """Controller (``memory``; ``""`` for cgroup2) to this process's cgroup path."""
    own: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                own[controller] = path
    return own


def probe(v2_parent: Path | None = None) -> MemorySupport:
    """Which memory controller the daemon can limit workers with, checked now."""
    own = _own_cgroups()
    reasons = []
    for fields in _mountinfo():
        if "-" not in fields:
            continue
        after = fields[fields.index("-") + 1 :]
        mount = Path(fields[4])
        if after[0] == "cgroup2" and "" in own:
            parent = v2_parent or mount / own[""].lstrip("/")
            enabled = _read_words(parent / "cgroup.subtree_control")
            if "memory" in enabled and os.access(parent, os.W_OK):
                return MemorySupport(2)
            listed = " ".join(enabled) or "empty"
            reasons.append(f"cgroup2 at {mount} does not delegate the memory controller to "
                           f"{parent} (cgroup.subtree_control: {listed})")  # fmt: skip
        elif after[0] == "cgroup" and "memory" in after[-1].split(",") and "memory" in own:
            parent = mount / own["memory"].lstrip("/")
            if os.access(parent, os.W_OK):
                return MemorySupport(1, parent)
            reasons.append(f"the cgroup v1 memory controller's {parent} is not writable")
    return MemorySupport(None, reason="; ".join(reasons) or "no memory cgroup controller mounted")


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []
