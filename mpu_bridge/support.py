"""Which upstream releases mpu-bridge was tested with, and a note when a newer one is installed.

mpu-bridge depends on torch, megatron-core and DeepSpeed with lower bounds only, so a
user's environment may hold a release newer than any the release matrix
(``compat/matrix/lines.json``) ran. That is allowed; :func:`note_untested_releases`
says so once, in one log line, so that a failure there can be told apart from a
regression. Versions are read from the installed distributions' metadata
(:mod:`importlib.metadata`): nothing is imported, and this module imports no torch.

Example (torch 2.16.0 installed, the newest tested line 2.15)::

    note_untested_releases()
    # WARNING mpu_bridge.support: mpu-bridge: newer than the newest release line it was
    # tested with: torch 2.16.0 (tested up to 2.15); please report problems with these versions
"""

from __future__ import annotations

import logging
from importlib import metadata
from typing import Dict, List, Optional

__all__ = ["NEWEST_TESTED", "newer_than_tested", "note_untested_releases"]

logger = logging.getLogger(__name__)

#: The newest release line (major.minor) of each upstream package that the release
#: matrix runs the whole suite with (the ``newest`` line of ``compat/matrix/lines.json``).
NEWEST_TESTED: Dict[str, str] = {
    "torch": "2.15",
    "megatron-core": "0.19",
    "deepspeed": "0.19",
}

_noted = False


def newer_than_tested(installed: Optional[Dict[str, str]] = None) -> List[str]:
    """``"<package> <version> (tested up to <line>)"`` for each installed package whose release
    line is newer than :data:`NEWEST_TESTED`'s, in the order of that table.

    ``installed`` maps distribution names to versions; by default they are read from
    the installed metadata (packages that are not installed, or whose version does
    not parse, are left out). Returns ``[]`` where :mod:`packaging` is not installed
    (a planner-only install: ``pip install --no-deps mpu-bridge``).

    Example: ``newer_than_tested({"torch": "2.16.0+cpu", "deepspeed": "0.19.9"})`` ->
    ``["torch 2.16.0+cpu (tested up to 2.15)"]``.
    """
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return []
    found = []
    for package, line in NEWEST_TESTED.items():
        if installed is None:
            try:
                text = metadata.version(package)
            except metadata.PackageNotFoundError:
                continue
        elif package in installed:
            text = installed[package]
        else:
            continue
        try:
            version = Version(text)
        except InvalidVersion:
            continue
        # The release line of the installed version (2.16.0rc1 and 2.16.3 are both in 2.16).
        if Version(f"{version.major}.{version.minor}") > Version(line):
            found.append(f"{package} {text} (tested up to {line})")
    return found


def note_untested_releases() -> Optional[str]:
    """Log one warning, the first time it is called in a process, naming every installed
    torch / megatron-core / DeepSpeed newer than the newest line tested; return that line
    (``None`` when there is nothing to say, or when it was already called).

    :func:`mpu_bridge.attach` calls it. Later calls read nothing and log nothing.
    """
    global _noted
    if _noted:
        return None
    _noted = True
    found = newer_than_tested()
    if not found:
        return None
    message = (
        "mpu-bridge: newer than the newest release line it was tested with: "
        + ", ".join(found)
        + "; please report problems with these versions"
    )
    logger.warning("%s", message)
    return message
