"""What the self-check checks: its options, their validation, and the groups every rank expects.

The expected groups come from the group families of :mod:`mpu_bridge.partitions`
(the same functions the bridge calls), over the planner's
:func:`~mpu_bridge.layout.plan`. No torch here.

Example::

    >>> expected_groups(SelfCheckConfig(tp=2, with_megatron=True), 4, 3)["data_parallel"]
    (1, 3)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .. import partitions
from ..errors import LayoutError
from ..kinds import KIND_BY_METHOD, KIND_TABLE, mesh_dims
from ..layout import DEFAULT_ORDER, Layout, plan
from ..spans import ModuleSpec, spans
from ..validate import positive_int

__all__ = [
    "DEFAULT_NPROC",
    "DEFAULT_TIMEOUT_S",
    "DENSE_METHODS",
    "EXPERT_MESH_DIMS",
    "FAULTS",
    "MESH_DIMS",
    "SelfCheckConfig",
    "expected_exports",
    "expected_groups",
    "export_label",
    "label",
    "module_configs",
    "validate",
]

#: Faults the hidden ``--inject-fault`` simulates on the last rank (to test the failure
#: paths). ``wrong-sum``: it contributes ``rank + world size`` to the all-reduce of the
#: first group kind with more than one rank, so every member of its group sees a wrong
#: sum (as if a foreign rank had joined). ``exit``: it exits with status 3 after creating
#: its groups, before any collective, leaving the others waiting for it.
FAULTS: Tuple[str, ...] = ("wrong-sum", "exit")

DEFAULT_NPROC = 8
DEFAULT_TIMEOUT_S = 300.0

#: The dense Bridge methods checked, in report order; each is also the report's label.
DENSE_METHODS: Tuple[str, ...] = (
    "tensor_parallel",
    "pipeline_parallel",
    "data_parallel",
    "sequence_parallel",
    "sequence_data_parallel",
    "model_parallel",
)


#: ``--exports``: the dims of the dense ``DeviceMesh`` checked (slowest first) and of the
#: expert one (one per expert-parallel size above 1), as kind names of :mod:`mpu_bridge.kinds`.
MESH_DIMS: Tuple[str, ...] = mesh_dims()
EXPERT_MESH_DIMS: Tuple[str, ...] = mesh_dims(expert=True)

#: ``--exports``: the ``ProcessGroupCollection`` fields with no kind of their own, as
#: megatron-core fills them with one distributed-optimizer instance and no hierarchical
#: context parallelism: a kind's field they equal, a family, or None (None on every rank: not checked).
_FIELD_RULES: Dict[str, Optional[str]] = {
    "embd": "embedding",
    "pos_embd": "position_embedding",
    "intra_dp_cp": "field:dp_cp",
    "intra_expt_dp": "field:expt_dp",
    "intra_dist_opt": "world",
    "hcp": None,
    "inter_dist_opt": None,
}


def label(name: str, option: str, value: int) -> str:
    """A report label for a family with an option, e.g. ``label("expert_parallel", "ep", 4)``
    -> ``"expert_parallel[ep=4]"``."""
    return f"{name}[{option}={value}]"


@dataclass(frozen=True)
class SelfCheckConfig:
    """What to check: the layout options of the command line.

    ``ep`` holds every expert-parallel size to check (the first one is megatron-core's
    ``expert_model_parallel_size`` with ``with_megatron``). ``nproc`` is the number of
    processes to spawn when no launcher started this one (``None``: 8). ``backend`` is
    ``"auto"``, ``"gloo"`` or ``"nccl"``; ``timeout`` bounds the whole run in seconds.

    Without ``with_megatron`` the sizes are a standalone layout (``attach(None, tp=...,
    ...)``). ``exports`` also checks the bridge's ``ProcessGroupCollection`` and
    ``DeviceMesh`` exports (``--exports``).

    ``modules`` (``--module``): a multi-module layout, one rank span per module (see
    :mod:`mpu_bridge.spans`); each module is checked with a config of its own
    (:func:`module_configs`), whose ``rank_offset`` and ``local_world_size`` place its span.

    Example: ``SelfCheckConfig(nproc=4, with_megatron=True, tp=2, ep=(2,), hpz=2)``.
    """

    nproc: Optional[int] = None
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: Tuple[int, ...] = (1,)
    etp: Optional[int] = None
    order: str = DEFAULT_ORDER
    gtp_remat: int = 1
    expert_gtp_remat: int = 1
    hpz: Optional[int] = None
    gpus_per_node: Optional[int] = None
    with_megatron: bool = False
    backend: str = "auto"
    timeout: float = DEFAULT_TIMEOUT_S
    inject_fault: Optional[str] = None
    verbose: bool = False
    exports: bool = False
    via_collection: bool = False
    modules: Tuple[ModuleSpec, ...] = ()
    rank_offset: int = 0
    local_world_size: Optional[int] = None

    def dense_layout(self, world_size: int, gpus_per_node: Optional[int] = None) -> Layout:
        """The planner's layout of the dense groups (and of ``ep[0]``).

        Example: ``SelfCheckConfig(tp=2).dense_layout(8).size("dp") == 4``.
        """
        return plan(
            self.local_world_size or world_size,
            tp=self.tp,
            pp=self.pp,
            cp=self.cp,
            ep=self.ep[0],
            etp=self.etp,
            order=self.order,
            gpus_per_node=gpus_per_node,
            gtp_remat=self.gtp_remat,
            expert_gtp_remat=self.expert_gtp_remat,
            rank_offset=self.rank_offset,
        )

    def mesh_dims(self, *, expert: bool = False) -> Tuple[str, ...]:
        """``--exports``: the dims of the dense (or expert) ``DeviceMesh`` checked, slowest
        first: :data:`MESH_DIMS` / :data:`EXPERT_MESH_DIMS`, with the GTP axis when active.

        Example: ``SelfCheckConfig(gtp_remat=2).mesh_dims() == ("pp", "dp", "cp", "gtp", "tp")``.
        """
        gtp = (self.expert_gtp_remat if expert else self.gtp_remat) > 1
        return mesh_dims(expert=expert, gtp=gtp)

    def expert_layout(self, world_size: int, ep_size: int) -> Layout:
        """The planner's layout for expert-parallel size ``ep_size`` (:func:`partitions.expert_layout`).

        Like :meth:`Bridge.expert_groups`: the same order, with ``ep`` put just before
        ``dp`` (Megatron's default place) when the order string leaves it out.

        Example: ``SelfCheckConfig(tp=2).expert_layout(8, 2).group_of("ep", 0) == [0, 2]``.
        """
        return partitions.expert_layout(self.dense_layout(world_size), ep_size, etp=self.etp)


def _check_run_options(config: SelfCheckConfig, world_size: int) -> None:
    """The options that are not sizes: the fault to inject and the timeout."""
    if config.inject_fault is not None and config.inject_fault not in FAULTS:
        raise LayoutError(f"unknown fault {config.inject_fault!r}; choose one of {', '.join(FAULTS)}")
    if config.inject_fault is not None and world_size < 2:
        raise LayoutError("--inject-fault needs at least 2 ranks (it breaks the last one)")
    if not config.timeout > 0:
        raise LayoutError(f"--timeout must be a positive number of seconds, got {config.timeout:g}")


def validate(config: SelfCheckConfig, world_size: int) -> Layout:
    """Check ``config`` for a world of ``world_size`` ranks before anything starts.

    Returns the dense layout; raises :class:`~mpu_bridge.errors.LayoutError` naming
    the numbers and the fix (the command then exits with status 2). Every family is
    built once for rank 0, so what the ranks will ask for is known to fit.

    The sizes need no MPU: without ``with_megatron`` they are a standalone layout.

    Example: ``validate(SelfCheckConfig(tp=3, with_megatron=True), 4)`` raises
    ``LayoutError("world size 4 is not divisible by tp·pp·cp = 3 ...")``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise LayoutError(f"the number of processes must be a positive integer, got {world_size!r}")
    if config.modules:
        _check_module_options(config)
        layouts = [validate(module, world_size) for _, module in module_configs(config, world_size)]
        _check_run_options(config, world_size)
        return layouts[0]
    if not config.ep:
        raise LayoutError("--ep needs at least one expert-parallel size")
    if config.hpz is not None:
        positive_int("--hpz", config.hpz)
    if config.gpus_per_node is not None:
        positive_int("--gpus-per-node", config.gpus_per_node)
    expected_groups(config, world_size, 0)  # every family's own checks (sizes, blocks, nodes)
    _check_run_options(config, world_size)
    return config.dense_layout(world_size)


def _check_module_options(config: SelfCheckConfig) -> None:
    """With ``--module``, the sizes are each module's, and the families beyond the dense kinds,
    experts and the world (hpZ, all-to-all, the exports, megatron-core's parallel_state) are
    not checked per module."""
    plain = SelfCheckConfig()
    given = [f"--{name.replace('_', '-')}" for name in ("tp", "pp", "cp", "ep", "etp", "gtp_remat",
                                                         "expert_gtp_remat", "hpz", "gpus_per_node")
             if getattr(config, name) != getattr(plain, name)]
    given += [flag for flag, on in (("--with-megatron", config.with_megatron), ("--exports", config.exports)) if on]
    if config.order != DEFAULT_ORDER:
        given.append("--order")
    if given:
        raise LayoutError(
            f"with --module, {', '.join(given)} cannot be given: each module's sizes go in its spec "
            "(e.g. --module encoder:ranks=2 --module llm:tp=2,pp=2)"
        )


def module_configs(config: SelfCheckConfig, world_size: int) -> Tuple[Tuple[str, SelfCheckConfig], ...]:
    """``(name, config)`` of each ``--module``: the run's options with the module's sizes and span.

    Example: ``module_configs(SelfCheckConfig(modules=parse_modules(["a:ranks=2", "b:tp=2"])), 6)[1][1].rank_offset
    == 2``.
    """
    out = []
    for spec, offset, size in spans(config.modules, world_size):
        ep = spec.size("ep") or 1
        out.append((spec.name, dataclasses.replace(
            config, modules=(), tp=spec.size("tp") or 1, pp=spec.size("pp") or 1, cp=spec.size("cp") or 1,
            ep=(ep,), etp=spec.size("etp", None), rank_offset=offset, local_world_size=size,
        )))
    return tuple(out)


def _dense_groups(dense: Layout, rank: int) -> Dict[str, Tuple[int, ...]]:
    return {
        method: tuple(sorted(partitions.dense(dense, KIND_BY_METHOD[method].name, rank).own or ()))
        for method in DENSE_METHODS
    }


def _expert_groups(config: SelfCheckConfig, world_size: int, rank: int) -> Dict[str, Tuple[int, ...]]:
    out: Dict[str, Tuple[int, ...]] = {}
    for ep_size in config.ep:
        experts = config.expert_layout(world_size, ep_size)
        for name, kind in (("expert_parallel", "ep"), ("expert_data_parallel", "edp")):
            own = partitions.dense(experts, kind, rank).own or ()
            out[label(name, "ep", ep_size)] = tuple(sorted(own))
    return out


def _optional_groups(config: SelfCheckConfig, dense: Layout, rank: int) -> Dict[str, Tuple[int, ...]]:
    """hpZ with ``hpz``, the all-to-all groups with ``gpus_per_node``."""
    out: Dict[str, Tuple[int, ...]] = {}
    if config.hpz is not None:
        block = partitions.hpz_block(dense, config.hpz)
        own = partitions.hpz(dense, block, rank).own or ()
        out[label("zero_param_intra_parallel", "hpz", config.hpz)] = tuple(sorted(own))
    if config.gpus_per_node is not None:
        names = ("all_to_all_local", "all_to_all_cross_node")
        parts = partitions.all_to_all(dense.world_size, config.gpus_per_node, rank, dense.rank_offset)
        for name, part in zip(names, parts, strict=False):
            out[label(name, "gpn", config.gpus_per_node)] = tuple(sorted(part.own or ()))
    return out


def expected_groups(config: SelfCheckConfig, world_size: int, rank: int) -> Dict[str, Tuple[int, ...]]:
    """What the group families say ``rank``'s group of every checked kind holds (ascending).

    Keys are the report's labels, in the order the self-check creates and checks them.

    Example: ``expected_groups(SelfCheckConfig(tp=2, with_megatron=True), 4, 3)["data_parallel"]
    == (1, 3)``.
    """
    dense = config.dense_layout(world_size)
    out = _dense_groups(dense, rank)
    out.update(_expert_groups(config, world_size, rank))
    out.update(_optional_groups(config, dense, rank))
    out["world"] = tuple(partitions.world(dense.world_size, rank, dense.rank_offset).own or ())
    return out


def export_label(export: str, name: str, ep_size: Optional[int] = None) -> str:
    """A report label of an exported group: ``"pg_collection.tp"``, ``"device_mesh.dp"``,
    ``"device_mesh[ep=2].etp"`` (``export`` is ``"pg_collection"`` or ``"device_mesh"``)."""
    where = export if ep_size is None else label(export, "ep", ep_size)
    return f"{where}.{name}"


def _own(part: partitions.Partition) -> Tuple[int, ...]:
    return tuple(sorted(part.own or ()))


def _expected_fields(dense: Layout, world_size: int, rank: int, fields: Tuple[str, ...]) -> Dict[str, Tuple[int, ...]]:
    field_kinds = {k.pg_field: k.name for k in KIND_TABLE if k.pg_field}
    out: Dict[str, Tuple[int, ...]] = {}
    for field in fields:
        rule = _FIELD_RULES.get(field, "unknown") if field not in field_kinds else "kind"
        if field == "expt_dp_ag" and dense.config.ep == 1:
            continue  # megatron-core's create_all_gather_groups makes none without experts
        if rule == "kind":
            out[field] = _own(partitions.dense(dense, field_kinds[field], rank))
        elif rule == "embedding":
            out[field] = _own(partitions.embedding(dense, rank))
        elif rule == "position_embedding":
            out[field] = _own(partitions.position_embedding(dense, rank))
        elif rule == "world":
            out[field] = _own(partitions.world(dense.world_size, rank, dense.rank_offset))
        elif rule is not None and rule.startswith("field:"):
            out[field] = _own(partitions.dense(dense, field_kinds[rule[len("field:"):]], rank))
        elif rule == "unknown":
            raise LayoutError(f"the self-check has no expectation for ProcessGroupCollection field {field!r}")
    return out


def expected_exports(
    config: SelfCheckConfig, world_size: int, rank: int, fields: Tuple[str, ...]
) -> Dict[str, Tuple[int, ...]]:
    """``--exports``: what ``rank``'s group of every checked export holds (ascending; ``()``
    where it is in none, as ``pos_embd`` off the first pipeline stage).

    ``fields`` are the ``ProcessGroupCollection`` field names (those of
    :data:`mpu_bridge.pg_collection.FIELDS` the installed release declares, passed in
    so this stays free of torch); fields megatron-core leaves None on every rank
    (``hcp``, ``inter_dist_opt``, ``expt_dp_ag`` without experts) are left out. The
    all-gather twins (``dp_cp_ag``, ``expt_dp_ag``) are checked as created with
    ``all_gather=True``: the ranks of ``dp_cp`` / ``expt_dp``, their own communicator.
    Then the dense mesh's :data:`MESH_DIMS` and, for every expert-parallel size above 1,
    the expert mesh's :data:`EXPERT_MESH_DIMS`.

    Example: ``expected_exports(SelfCheckConfig(tp=2), 4, 3, ("tp", "hcp"))
    == {"pg_collection.tp": (2, 3), "device_mesh.pp": (3,), ...}``.
    """
    dense = config.dense_layout(world_size)
    fields_expected = _expected_fields(dense, world_size, rank, fields)
    out = {export_label("pg_collection", f): ranks for f, ranks in fields_expected.items()}
    for dim in config.mesh_dims():
        out[export_label("device_mesh", dim)] = _own(partitions.dense(dense, dim, rank))
    for ep_size in config.ep:
        if ep_size > 1:
            experts = config.expert_layout(world_size, ep_size)
            for dim in config.mesh_dims(expert=True):
                out[export_label("device_mesh", dim, ep_size)] = _own(partitions.dense(experts, dim, rank))
    return out
