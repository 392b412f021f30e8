"""Every private ``torch.distributed`` access of the package, in one place.

PyTorch does not expose the default group, the default store, the table of live
groups or the names it gives member-only groups; the registry needs all four. If
a PyTorch release moves them, this is the one module to change. How PyTorch names
member-only groups changed in 2.14; :func:`member_only_naming` finds the running
release's rule by behaviour and says so when it recognises none.

Example::

    >>> member_only_naming().salt          # doctest: +SKIP
    3
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch.distributed as dist
from torch.distributed import distributed_c10d as _c10d

__all__ = [
    "default_group",
    "default_store",
    "is_live",
    "live_groups",
    "group_counter",
    "advance_group_counter",
    "counter_is_salt",
    "counter_at",
    "group_name",
    "hashed_group_name",
    "MemberOnlyNaming",
    "member_only_naming",
    "distrust",
    "let_workers_retire",
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


def live_groups() -> List[Any]:
    """Every process group torch.distributed holds now (the default group among them)."""
    return list(_c10d._world.pg_map)


def group_counter() -> int:
    """PyTorch's group counter on this rank (``_world.group_count``): the name of the next
    all-ranks ``new_group`` group, which every rank must agree on."""
    return int(getattr(_c10d._world, "group_count", 0))


def advance_group_counter(value: int) -> None:
    """Move PyTorch's group counter up to ``value`` (never down: names stay unique).

    The registry calls it on every rank, with one value, after a batch it created member-only
    that left ranks out: from 2.14 such a creation moves the counter on its members alone,
    and the next all-ranks group would be named differently on different ranks. Skipped
    numbers are harmless (names must be unique, not contiguous). Example:
    ``advance_group_counter(group_counter() + 3)``.
    """
    if value > group_counter():
        _c10d._world.group_count = value


def counter_is_salt() -> bool:
    """Whether PyTorch hashes its group counter into member-only group names (it does from
    2.14), found by behaviour: the counter is moved to a probe value for one call of
    ``_hash_ranks_to_str`` and put back. False where naming is not recognised at all."""
    if not member_only_naming().recognised:
        return False
    saved = group_counter()
    trial = saved + len(_c10d._world.pg_names) + 1_000_003  # equals no held-group count
    try:
        with counter_at(trial):
            return str(_c10d._hash_ranks_to_str(list(_PROBE_RANKS))) == hashed_group_name(_PROBE_RANKS, trial)
    except Exception:  # a changed private API: not the counter, whatever it raises
        return False


@contextlib.contextmanager
def counter_at(value: int) -> Iterator[None]:
    """Run the body with PyTorch's group counter at ``value``, then put the counter back.

    Where :func:`counter_is_salt`, a member-only group created inside is named
    ``sha1("<ranks>_<value>")``: a name the caller chose, and the counter -- which names
    every all-ranks group -- is left as it was. Example:
    ``with counter_at(2**52): new_group(ranks, use_local_synchronization=True)``.
    """
    saved = group_counter()
    _c10d._world.group_count = value
    try:
        yield
    finally:
        _c10d._world.group_count = saved


def group_name(group: Any) -> Optional[str]:
    """The name PyTorch gave ``group``, or None."""
    return _c10d._world.pg_names.get(group)


def hashed_group_name(ranks: Sequence[int], salt: int) -> str:
    """The name PyTorch gives a member-only group of ``ranks`` at ``salt``:
    ``sha1("r0_r1_..._<salt>")`` (``distributed_c10d._hash_ranks_to_str``; which number
    the salt is depends on the release, see :func:`member_only_naming`)."""
    text = "_".join(map(str, ranks)) + "_" + str(salt)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


#: The salts PyTorch releases are known to hash into member-only group names, by where
#: they live: up to 2.13 the number of groups this process holds, from 2.14 the group
#: counter (which then also moves with every member-only group its caller creates).
SALT_SOURCES = ("pg_names", "group_count")

#: Ranks hashed by the probe; any list would do, this one costs O(1).
_PROBE_RANKS = [0]

#: Why member-only naming stopped being trusted in this process (see :func:`distrust`).
#: Process-wide on purpose, like PyTorch's own naming state it is about: a PyTorch that
#: once named a group otherwise than predicted is not trusted again for the life of the
#: process, in any world or registry (the safe direction: the all-ranks loop).
_doubt: Optional[str] = None


@dataclass(frozen=True)
class MemberOnlyNaming:
    """How this process's PyTorch will name its next member-only group, found by behaviour.

    ``salt``: the number PyTorch will hash into the name (None: not recognised, see
    ``problem``). ``source``: which of :data:`SALT_SOURCES` it is, or ``"both"`` when the
    two are equal now (the probe cannot tell them apart, and either is right), or ``""``.
    """

    salt: Optional[int]
    source: str
    problem: str = ""

    @property
    def recognised(self) -> bool:
        return self.salt is not None

    @property
    def counter_apart(self) -> bool:
        """Whether creating a member-only group leaves PyTorch's group counter (the names of
        all-ranks groups) alone: known only when the salt is the held-group count alone."""
        return self.source == "pg_names"


def member_only_naming() -> MemberOnlyNaming:
    """Which number PyTorch hashes into member-only group names, by asking PyTorch itself.

    Calls PyTorch's own ``_hash_ranks_to_str`` (it only reads) on a probe list and compares
    with :func:`hashed_group_name` salted by each known candidate (:data:`SALT_SOURCES`);
    never by version string. A PyTorch whose naming matches none of them -- or that once
    named a group otherwise than predicted (:func:`distrust`) -- is *not recognised*: the
    registry then never creates groups member-only. Example: ``member_only_naming().salt``
    is ``len(_world.pg_names)`` on torch 2.13 and ``_world.group_count`` on 2.14.
    """
    if _doubt is not None:
        return MemberOnlyNaming(None, "", _doubt)
    probe = getattr(_c10d, "_hash_ranks_to_str", None)
    world = getattr(_c10d, "_world", None)
    if not callable(probe) or world is None:
        return MemberOnlyNaming(None, "", "torch.distributed.distributed_c10d has no _hash_ranks_to_str or _world")
    try:
        expected = str(probe(list(_PROBE_RANKS)))
        candidates = {"pg_names": len(world.pg_names), "group_count": getattr(world, "group_count", None)}
    except Exception as exc:  # a changed private API: unrecognised, whatever it raises
        return MemberOnlyNaming(None, "", f"probing distributed_c10d._hash_ranks_to_str failed: {exc!r}")
    found = {
        source: value
        for source, value in candidates.items()
        if isinstance(value, int) and hashed_group_name(_PROBE_RANKS, value) == expected
    }
    if not found:
        return MemberOnlyNaming(
            None,
            "",
            "distributed_c10d._hash_ranks_to_str salts member-only group names with neither "
            "len(_world.pg_names) nor _world.group_count",
        )
    source = next(iter(found)) if len(found) == 1 else "both"
    return MemberOnlyNaming(next(iter(found.values())), source)


def distrust(problem: str) -> None:
    """Stop trusting :func:`member_only_naming` in this process: PyTorch named a group
    otherwise than it predicted (``problem`` says how). Later batches use the all-ranks loop."""
    global _doubt
    _doubt = problem


def let_workers_retire(seconds: float = 0.2) -> None:
    """Sleep ``seconds`` (releasing the GIL) when the default group is gloo, so its worker
    threads can retire the collectives they just ran before a group's last reference goes.

    PyTorch up to 2.7 runs a ProcessGroup's C++ destructor with the GIL held, and a gloo
    group's destructor joins its worker threads, one of which may still need the GIL to
    free a finished collective's tensors: a deadlock (pytorch/pytorch#154976). Call it
    before ``destroy_process_group()`` right after collectives. Example: in a launcher's
    teardown, ``let_workers_retire(); dist.destroy_process_group()``.
    """
    group = default_group()
    if group is not None and str(dist.get_backend(group)).lower() == "gloo":
        time.sleep(seconds)


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
    root mesh is deprecated; torch 2.13 has it); older releases (torch 2.6) keep them in
    the module's ``_mesh_resources.root_to_flatten_mapping``. Found by feature, not version.
    """
    root_of = getattr(mesh, "_get_root_mesh", None)
    if callable(root_of):
        root = root_of()
    else:
        resources = _mesh_resources()
        root = resources.get_root_mesh(mesh) if hasattr(resources, "get_root_mesh") else mesh
    mapping = getattr(root, "_flatten_mapping", None)
    if mapping is None:
        mapping = getattr(_mesh_resources(), "root_to_flatten_mapping", {}).get(root)
    return {str(name): sub for name, sub in (mapping or {}).items()}


def _mesh_resources() -> Any:
    """``torch.distributed.device_mesh._mesh_resources`` (the mesh bookkeeping of older
    releases), or None."""
    from torch.distributed import device_mesh

    return getattr(device_mesh, "_mesh_resources", None)
