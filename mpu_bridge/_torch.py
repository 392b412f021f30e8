"""Every private ``torch.distributed`` access of the package, in one place.

PyTorch does not expose the default group, the default store, the table of live
groups or the names it gives member-only groups; the registry needs all four. If
a PyTorch release moves them, this is the one module to change.

Example::

    >>> groups_held()          # doctest: +SKIP
    3
"""

from __future__ import annotations

import hashlib
import inspect
from typing import Any, Callable, Dict, Optional, Sequence

import torch.distributed as dist
from torch.distributed import distributed_c10d as _c10d

__all__ = [
    "default_group",
    "default_store",
    "is_live",
    "groups_held",
    "group_counter",
    "group_name",
    "hashed_group_name",
    "bound_device",
    "supports",
    "mesh_flattened",
]


def default_group() -> Any:
    """The default (world) process group; None when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    return _c10d._get_default_group()


def default_store() -> Any:
    """The default group's key-value store (TCPStore, FileStore, FakeStore ...)."""
    return _c10d._get_default_store()


def is_live(group: Any) -> bool:
    """Whether ``group`` is a process group torch.distributed still holds (not destroyed)."""
    return group in _c10d._world.pg_map


def groups_held() -> int:
    """How many process groups this process holds (the number PyTorch hashes into
    the names of member-only groups)."""
    return len(_c10d._world.pg_names)


def group_counter() -> int:
    """PyTorch's sequential counter of all-ranks groups (names of ``new_group``)."""
    return int(getattr(_c10d._world, "group_count", 0))


def group_name(group: Any) -> Optional[str]:
    """The name PyTorch gave ``group``, or None."""
    return _c10d._world.pg_names.get(group)


def hashed_group_name(ranks: Sequence[int], held: int) -> str:
    """The name torch 2.x gives a member-only group: ``sha1("r0_r1_..._<groups held>")``.

    Mirrors ``distributed_c10d._hash_ranks_to_str``; the registry checks the
    prediction against :func:`group_name` and warns if PyTorch changes it.
    """
    text = "_".join(map(str, ranks)) + "_" + str(held)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def bound_device() -> Any:
    """The device the default group is bound to (NCCL with ``device_id``), else None."""
    return getattr(_c10d._get_default_group(), "bound_device_id", None)


def supports(fn: Callable[..., Any], parameter: str) -> bool:
    """Whether ``fn`` takes a keyword ``parameter`` (PyTorch's signatures change by release)."""
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def mesh_flattened(mesh: Any) -> Dict[str, Any]:
    """The flattened dimensions of ``mesh``'s root mesh (``mesh[...]._flatten("dp")``),
    by name: 1-d DeviceMeshes of this rank; empty when there are none.

    PyTorch keeps them in the root's private ``_flatten_mapping`` (slicing them from the
    root mesh is deprecated); torch 2.13 has it.
    """
    root_of = getattr(mesh, "_get_root_mesh", None)
    root = root_of() if callable(root_of) else mesh
    mapping = getattr(root, "_flatten_mapping", None) or {}
    return {str(name): sub for name, sub in mapping.items()}
