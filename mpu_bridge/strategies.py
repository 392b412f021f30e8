"""Three ways to create the groups of one partition; the registry picks one per batch.

* :class:`SplitGroup` -- one ``torch.distributed.split_group`` per partition, when the
  default group has a bound device (NCCL with ``device_id``). There every
  ``new_group`` is already a world-wide split, and member-only creation hangs.
* :class:`LocalNewGroup` -- each rank creates only its own group,
  ``new_group(own, use_local_synchronization=True)``; non-members do nothing.
* :class:`AllRanksNewGroup` -- every rank enters every group's ``new_group`` in the
  agreed order (what megatron-core does); the fallback for everything else.
* :class:`SaltedNewGroup` -- member-only, each group named with a salt the registry
  chose (where PyTorch's group counter is the salt: from 2.14), the counter put back
  after: for a registry whose batches only a rank span's members take part in.

:func:`choose` resolves ``"auto"`` (or checks an explicit request) from the runtime
state once per registry. Each strategy's ``create(partition)`` returns this rank's
group, or None when the rank is in none of the partition's groups.

Example::

    strategy = choose("auto", backend="gloo", default_backend="gloo")
    group = strategy.create(partition, timeout=timedelta(minutes=10), pg_options=None, backend=None)
"""

from __future__ import annotations

import datetime
import logging
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from . import _torch
from .errors import GroupCreationError, LayoutError
from .partitions import Partition, _check_ranks, abbrev

__all__ = ["Strategy", "SplitGroup", "LocalNewGroup", "SaltedNewGroup", "AllRanksNewGroup", "choose", "by_name"]

logger = logging.getLogger(__name__)


class Strategy:
    """How a partition's groups are created (see the module docstring)."""

    name = ""

    def __init__(
        self, *, timeout: datetime.timedelta, pg_options: Optional[object], backend: Optional[str]
    ) -> None:
        self.timeout = timeout
        self.pg_options = pg_options
        self.backend = backend  # None: the default group's backend

    def create(self, p: Partition) -> Optional[Any]:
        raise NotImplementedError

    def _new_group_kwargs(self, key: str) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"timeout": self.timeout, "pg_options": self.pg_options}
        if self.backend is not None:
            kwargs["backend"] = self.backend
        if _torch.supports(dist.new_group, "group_desc"):
            kwargs["group_desc"] = key
        return kwargs


class SplitGroup(Strategy):
    """One ``split_group`` call per partition (default group bound to a device)."""

    name = "split_group"

    def create(self, p: Partition) -> Optional[Any]:
        # split_group only uses the caller's own group (it computes the split color from
        # it), so each member passes just its group: O(group size), not O(world). A rank
        # in no group passes a group without itself and gets None back (NCCL no-color).
        split_ranks = [list(p.own)] if p.own is not None else [list(p.first_group())]
        kwargs: Dict[str, Any] = {"timeout": self.timeout, "pg_options": self.pg_options}
        if _torch.supports(dist.split_group, "group_desc"):
            kwargs["group_desc"] = p.key
        return dist.split_group(None, split_ranks, **kwargs)


class LocalNewGroup(Strategy):
    """Member-only ``new_group``: each rank creates just its own group.

    ``last_name`` is the PyTorch name of the group this rank created last (the registry
    marks it used in the store, see :mod:`mpu_bridge.registry`). Each creation checks
    PyTorch's name against :func:`mpu_bridge._torch.member_only_naming`'s prediction;
    a mismatch is logged and ends member-only creation in this process.
    """

    name = "local_new_group"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_name: Optional[str] = None

    def create(self, p: Partition) -> Optional[Any]:
        if p.own is None:
            return None
        naming = _torch.member_only_naming()
        counter = _torch.group_counter()
        group = dist.new_group(list(p.own), use_local_synchronization=True, **self._new_group_kwargs(p.key))
        name = _torch.group_name(group)
        if naming.salt is not None and (name is None or len(p.own) <= CHECK_NAMES_UP_TO):
            predicted = _torch.hashed_group_name(p.own, naming.salt)
            _check_naming(name, predicted, naming, _torch.group_counter() - counter)
            name = name or predicted
        elif naming.salt is not None:  # a large group: the counter's move still checks the rule
            _check_naming(None, "", naming, _torch.group_counter() - counter)
        self.last_name = name
        return group


class SaltedNewGroup(LocalNewGroup):
    """Member-only ``new_group``, the ``i``-th created partition of a batch named with salt
    ``base + i`` (:func:`mpu_bridge.planning.span_salt`), PyTorch's group counter put back
    after each (:func:`mpu_bridge._torch.counter_at`): every member hashes the same salt
    whatever groups it held before, names never repeat, and no rank's counter moves.
    Only where :func:`mpu_bridge._torch.counter_is_salt`. One instance per batch; every
    rank calls :meth:`create` for every created partition, members or not."""

    name = "salted_local_new_group"

    def __init__(self, *, base: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.base = base
        self.count = 0

    def create(self, p: Partition) -> Optional[Any]:
        salt = self.base + self.count
        self.count += 1
        if self.count > SALTS_PER_BATCH:
            raise GroupCreationError(f"a batch creates at most {SALTS_PER_BATCH} partitions; split the request")
        if p.own is None:
            return None
        with _torch.counter_at(salt):
            group = dist.new_group(list(p.own), use_local_synchronization=True, **self._new_group_kwargs(p.key))
        name = _torch.group_name(group)
        if name is None or len(p.own) <= CHECK_NAMES_UP_TO:  # as LocalNewGroup: small groups carry the check
            predicted = _torch.hashed_group_name(p.own, salt)
            if name is not None and name != predicted:
                _torch.distrust(f"PyTorch named a member-only group {name}, not {predicted} (salt {salt})")
            name = name or predicted
        self.last_name = name
        return group


#: Salts one :class:`SaltedNewGroup` batch may use (see :func:`mpu_bridge.planning.span_salt`).
SALTS_PER_BATCH = 4096


#: Member-only groups up to this size have their PyTorch name checked against the predicted
#: one (a hash of every rank: as costly as PyTorch's own); every batch has such groups, and the
#: rule is one per process. Larger ones are checked by how the creation moved the counter.
CHECK_NAMES_UP_TO = 512


def _check_naming(name: Optional[str], predicted: str, naming: _torch.MemberOnlyNaming, moved: int) -> None:
    """Distrust member-only naming for good if PyTorch named a group otherwise than predicted,
    or moved its group counter otherwise than the probed rule implies."""
    problem = None
    if name is not None and name != predicted:
        problem = f"PyTorch named a member-only group {name}, not {predicted} as its own _hash_ranks_to_str predicted"
    elif moved not in {"pg_names": (0,), "group_count": (1,)}.get(naming.source, (0, 1)):
        problem = (
            f"creating a member-only group moved PyTorch's group counter by {moved}, which its salt "
            f"({naming.source}) does not explain"
        )
    if problem is not None:
        _torch.distrust(problem)
        logger.warning(
            "mpu-bridge: %s; from now on this process creates groups with new_group on every rank", problem
        )


class AllRanksNewGroup(Strategy):
    """Every rank enters every group's ``new_group``, in the agreed order."""

    name = "new_group"

    def create(self, p: Partition) -> Optional[Any]:
        own = tuple(p.own) if p.own is not None else None
        kwargs = self._new_group_kwargs(p.key)
        world_size = dist.get_world_size()
        mine = None
        count = 0
        for members in p.groups():
            ranks: List[int] = list(members)
            if not p.trusted:
                ranks = sorted(int(r) for r in ranks)
                _check_ranks(p.key, ranks, p.group_size, world_size)
            group = dist.new_group(ranks, **kwargs)
            count += 1
            if own is not None and tuple(ranks) == own:
                mine = group
        if count != p.num_groups:
            raise LayoutError(f"partition {p.key!r} enumerated {count} groups, but num_groups is {p.num_groups}")
        if own is not None and mine is None:
            raise LayoutError(
                f"partition {p.key!r}: this rank's own group {abbrev(own)} is not among the groups it enumerates"
            )
        return mine


_BY_NAME = {cls.name: cls for cls in (SplitGroup, LocalNewGroup, AllRanksNewGroup)}


def by_name(name: str, **kwargs: Any) -> Strategy:
    """The strategy called ``name`` (one of :data:`mpu_bridge.planning.STRATEGIES`)."""
    return _BY_NAME[name](**kwargs)


def choose(requested: str, *, backend: str, default_backend: str) -> str:
    """The strategy to use: ``requested`` checked against the runtime, or ``"auto"`` resolved.

    Raises GroupCreationError naming what is missing when an explicit request cannot work.
    Member-only creation needs a PyTorch whose naming of such groups is recognised
    (:func:`mpu_bridge._torch.member_only_naming`); ``"auto"`` falls back to the all-ranks
    loop otherwise, and says why once per process. Example: on a gloo world,
    ``choose("auto", backend="gloo", default_backend="gloo")`` is ``"local_new_group"``.
    """
    bound = _torch.bound_device()
    same_backend = backend == default_backend
    has_split = hasattr(dist, "split_group")
    has_local = _torch.supports(dist.new_group, "use_local_synchronization") and backend != "mpi"
    if requested == "split_group":
        _check_split(bound, has_split, same_backend, backend, default_backend)
        return "split_group"
    if requested == "local_new_group":
        if bound is not None:
            raise GroupCreationError(
                f"strategy 'local_new_group' hangs when the default group is bound to a device "
                f"({bound}): every new_group is then a world-wide split that non-members "
                "never join; use strategy='auto' (split_group)"
            )
        if not has_local:
            raise GroupCreationError(
                f"strategy 'local_new_group' needs new_group(use_local_synchronization=True) "
                f"(PyTorch >= 2.1, not MPI); backend {backend!r}; use strategy='auto'"
            )
        naming = _torch.member_only_naming()
        if not naming.recognised:
            raise GroupCreationError(
                "strategy 'local_new_group' needs to predict the names PyTorch gives member-only "
                f"groups, and this PyTorch's naming is not recognised: {naming.problem}; use "
                "strategy='auto' (the all-ranks new_group loop) or strategy='new_group'"
            )
        return "local_new_group"
    if requested == "new_group":
        return "new_group"
    if bound is not None:
        return "split_group" if (has_split and same_backend) else "new_group"
    if not has_local:
        return "new_group"
    naming = _torch.member_only_naming()
    if not naming.recognised:
        if naming.problem not in _told:
            _told.add(naming.problem)
            logger.warning(
                "mpu-bridge: not creating groups member-only: this PyTorch's naming of member-only "
                "groups is not recognised (%s); every rank enters every group's new_group instead",
                naming.problem,
            )
        return "new_group"
    return "local_new_group"


#: The unrecognised-naming problems already logged in this process (one line each).
_told: set = set()


def _check_split(bound: Any, has_split: bool, same_backend: bool, backend: str, default_backend: str) -> None:
    if bound is None:
        raise GroupCreationError(
            "strategy 'split_group' needs a default process group bound to a device "
            "(init_process_group(backend='nccl', device_id=torch.device('cuda', local_rank))); "
            f"this one (backend {default_backend!r}) has none; use strategy='auto'"
        )
    if not has_split:
        raise GroupCreationError(
            "strategy 'split_group' needs torch.distributed.split_group (PyTorch >= 2.5); use strategy='auto'"
        )
    if not same_backend:
        raise GroupCreationError(
            f"strategy 'split_group' keeps the default group's backend {default_backend!r}, but backend "
            f"{backend!r} was asked for; use strategy='new_group' or drop the backend argument"
        )
