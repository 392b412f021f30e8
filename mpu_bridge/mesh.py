"""The bridge and PyTorch's ``DeviceMesh`` (FSDP2, DTensor, torchtitan): export and import.

Export: :func:`device_mesh` (``Bridge.device_mesh``). Import: ``attach(mesh)`` reads a
``DeviceMesh`` with named dims through :class:`MeshMpu`, a megatron-core-style MPU over
the mesh's own groups (see its docstring for the accepted names).

:func:`device_mesh` builds a :class:`torch.distributed.device_mesh.DeviceMesh` with
``DeviceMesh.from_group`` from the bridge's own groups, one per mesh dimension, so
``mesh[name].get_group()`` is the bridge's group object (the MPU's own, where it has
one) and building the mesh creates no communicator beyond the bridge's groups. The
mesh tensor (global ranks, one axis per dimension) is computed from the bridge's
layout by arithmetic, so it is right for any rank order; each dimension's group is
checked against it.

A dimension is any kind of :mod:`mpu_bridge.kinds` (``"dp"``, ``"data_parallel"``,
``"dp-cp"`` ...) of one rank grid: the dense grid (tp, cp, dp, pp) or the expert grid
(etp, ep, edp, pp). The dimensions must not overlap and must together cover every
dimension of the grid whose size is above 1. Mesh dimension names default to the
kind table's ``mesh_dim`` column.

Defaults:

* dense: ``("pp", "dp", "cp", "tp")``, named ``pp``, ``dp``, ``cp``, ``tp``;
* expert: ``("pp", "edp", "ep", "etp")``, named ``pp``, ``edp``, ``ep``, ``etp``;
* size-1 dimensions are kept (``keep_size_one=False`` drops them; a world of one keeps
  the last dimension);
* ``device_type="cpu"`` (``"cuda"`` for NCCL groups).

Like every group request, building a mesh is collective the first time (the bridge
may have to create groups it does not hold yet); all ranks must call it alike.

Example (every rank)::

    bridge = mpu_bridge.attach(parallel_state)          # tp 2, dp 2 on 4 ranks
    mesh = bridge.device_mesh()                         # dims pp, dp, cp, tp
    mesh["dp"].get_group() is bridge.data_parallel().group     # True
    mesh = bridge.device_mesh(("dp", "tp"), keep_size_one=False)
    experts = bridge.device_mesh(expert=True, ep_size=2)       # pp, edp, ep, etp
    again = mpu_bridge.attach(mesh)                     # the same layout and group objects
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .errors import BridgeError
from .kinds import Kind, kind_named, mesh_dims
from .layout import Layout, RankGrid
from .validate import boolean, positive_int

if TYPE_CHECKING:  # pragma: no cover
    from .bridge import Bridge

__all__ = [
    "DENSE_DIMS",
    "EXPERT_DIMS",
    "MESH_ROOT_NAMES",
    "MESH_FLAT_NAMES",
    "MeshMpu",
    "device_mesh",
    "mesh_dim_name",
    "mesh_ranks",
]

#: Default dimensions of the dense mesh, slowest first.
DENSE_DIMS: Tuple[str, ...] = mesh_dims()
#: Default dimensions of the expert mesh, slowest first.
EXPERT_DIMS: Tuple[str, ...] = mesh_dims(expert=True)

Names = Union[Mapping[str, str], Sequence[str], None]


def mesh_dim_name(kind: Kind) -> str:
    """The default mesh dimension name of ``kind``: its ``mesh_dim``, else its name with ``_``."""
    return kind.mesh_dim or kind.name.replace("-", "_")


def _kinds(dims: Any, expert: bool) -> List[Kind]:
    """The kinds named by ``dims``, all of the mesh's grid (``pp`` belongs to both)."""
    if isinstance(dims, str) or not isinstance(dims, (tuple, list)):
        raise BridgeError(
            f"dims must be a tuple of group kinds such as {DENSE_DIMS!r}, got {dims!r} ({type(dims).__name__})"
        )
    if not dims:
        raise BridgeError("dims is empty; name at least one group kind, e.g. ('dp',)")
    grid = "expert" if expert else "dense"
    kinds = []
    for dim in dims:
        try:
            kind = kind_named(dim) if isinstance(dim, str) else None
        except KeyError as exc:
            raise BridgeError(f"device_mesh: {exc.args[0]}") from None
        if kind is None:
            raise BridgeError(f"dims must hold kind names (strings), got {dim!r} ({type(dim).__name__})")
        if kind.grid != grid and kind.name != "pp":
            other = "dense" if expert else "expert"
            raise BridgeError(
                f"{dim!r} is a kind of the {other} grid, but this mesh is over the {grid} grid "
                f"(dims such as {EXPERT_DIMS if expert else DENSE_DIMS!r}); "
                f"{'drop expert=True' if expert else 'pass expert=True'} for a mesh of {other} kinds"
            )
        kinds.append(kind)
    return kinds


def _names(kinds: Sequence[Kind], names: Names) -> List[str]:
    """Mesh dimension names: defaults, a mapping from kind to name, or one name per dim."""
    if names is None:
        chosen = [mesh_dim_name(k) for k in kinds]
    elif isinstance(names, Mapping):
        by_kind: Dict[str, str] = {}
        for key, value in names.items():
            try:
                by_kind[kind_named(key).name] = value
            except (KeyError, TypeError):
                raise BridgeError(f"names has an unknown group kind {key!r}") from None
        unused = set(by_kind) - {k.name for k in kinds}
        if unused:
            raise BridgeError(f"names renames kinds that are not dims of this mesh: {', '.join(sorted(unused))}")
        chosen = [by_kind.get(k.name, mesh_dim_name(k)) for k in kinds]
    elif isinstance(names, (tuple, list)):
        if len(names) != len(kinds):
            raise BridgeError(f"names has {len(names)} entries for {len(kinds)} dims; give one name per dim")
        chosen = list(names)
    else:
        raise BridgeError(f"names must be None, a mapping kind -> name, or a tuple of names, got {names!r}")
    for name in chosen:
        if not isinstance(name, str) or not name:
            raise BridgeError(f"mesh dimension names must be non-empty strings, got {name!r}")
    if len(set(chosen)) != len(chosen):
        raise BridgeError(f"mesh dimension names must be distinct, got {tuple(chosen)!r}")
    return chosen


def _masked(grid: RankGrid, kind: Kind) -> Tuple[Tuple[int, int], ...]:
    """(size, stride) of the grid dimensions that vary inside one group of ``kind``."""
    return grid.geometry(kind.tokens).masked


def _check_cover(grid: RankGrid, kinds: Sequence[Kind], expert: bool) -> None:
    seen: Dict[str, str] = {}
    for kind in kinds:
        for token in kind.tokens:
            if token in seen:
                raise BridgeError(
                    f"dims {seen[token]!r} and {kind.name!r} both span the grid dimension {token!r}; "
                    "mesh dimensions must not overlap"
                )
            seen[token] = kind.name
    label = {"tp": "etp", "dp": "edp"} if expert else {}
    missing = [
        f"{label.get(token, token)} (size {size})"
        for token, size in zip(grid.order, grid.sizes)
        if size > 1 and token not in seen
    ]
    if missing:
        names = ", ".join(missing)
        raise BridgeError(
            f"the dims {tuple(k.name for k in kinds)!r} leave out the {'expert' if expert else 'dense'} "
            f"grid's {names}; a mesh must cover every rank: add them to dims"
        )


def mesh_ranks(layout: Layout, dims: Sequence[str], *, expert: bool = False) -> List[Any]:
    """The mesh of global ranks (nested lists, one axis per dim) of ``layout``; pure arithmetic.

    Along each axis a rank's coordinate is its place in its group of that kind
    (ascending ranks), so every 1-d slice is one group, in group-rank order.

    Example::

        >>> mesh_ranks(plan(8, tp=2, pp=2), ("pp", "dp", "tp"))
        [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    """
    kinds = _kinds(dims, expert)
    grid = layout.expert if expert else layout.dense
    _check_cover(grid, kinds, expert)
    return _nest(_flat_mesh(grid, kinds, layout.rank_offset), [_size(grid, k) for k in kinds])


def _size(grid: RankGrid, kind: Kind) -> int:
    return math.prod(size for size, _ in _masked(grid, kind))


def _flat_mesh(grid: RankGrid, kinds: Sequence[Kind], rank_offset: int = 0) -> List[int]:
    """The mesh's global ranks, flat: each rank of ``grid`` (plus ``rank_offset``, a span's first
    rank) at the place its coordinates give."""
    shape = [_size(grid, k) for k in kinds]
    masked = [_masked(grid, k) for k in kinds]
    flat = [0] * grid.world_size
    for rank in range(grid.world_size):
        index = 0
        for dims, size in zip(masked, shape):
            position, scale = 0, 1
            for dim_size, stride in dims:
                position += ((rank // stride) % dim_size) * scale
                scale *= dim_size
            index = index * size + position
        flat[index] = rank + rank_offset
    return flat


def _nest(flat: List[int], shape: Sequence[int]) -> List[Any]:
    out: List[Any] = list(flat)
    for size in reversed(shape[1:]):
        out = [out[i:i + size] for i in range(0, len(out), size)]
    return out


def device_mesh(
    bridge: "Bridge",
    dims: Optional[Sequence[str]] = None,
    *,
    expert: bool = False,
    ep_size: Optional[int] = None,
    names: Names = None,
    keep_size_one: bool = True,
    device_type: str = "cpu",
) -> DeviceMesh:
    """A ``DeviceMesh`` over ``bridge``'s groups; see the module docstring and :meth:`Bridge.device_mesh`."""
    expert = boolean("expert", expert)
    keep_size_one = boolean("keep_size_one", keep_size_one)
    if not isinstance(device_type, str) or not device_type or ":" in device_type:
        raise BridgeError(f"device_type must be a device type such as 'cpu' or 'cuda' (no index), got {device_type!r}")
    if ep_size is not None and not expert:
        raise BridgeError("ep_size is for the expert mesh: pass expert=True with it")
    layout = bridge.layout
    if dims is None:  # every dimension, the GTP axis too where it is above 1
        c = layout.config
        dims = mesh_dims(expert=expert, gtp=(c.expert_gtp_remat if expert else c.gtp_remat) > 1)
    kinds = _kinds(dims, expert)
    chosen = _names(kinds, names)
    if expert:
        if ep_size is not None:
            layout = bridge.expert_groups(positive_int("ep_size", ep_size)).layout
        elif layout.config.ep == 1:
            raise BridgeError(
                "this bridge has no expert parallelism of its own (ep = 1): pass "
                "device_mesh(expert=True, ep_size=N) for the expert-parallel size"
            )
    grid = layout.expert if expert else layout.dense
    _check_cover(grid, kinds, expert)
    pairs = list(zip(kinds, chosen))
    if not keep_size_one:
        pairs = [(k, n) for k, n in pairs if _size(grid, k) > 1] or pairs[-1:]
    kinds = [k for k, _ in pairs]
    shape = [_size(grid, k) for k in kinds]
    flat = _flat_mesh(grid, kinds, layout.rank_offset)
    bridge.prepare([k.name for k in kinds], expert_sizes=[] if ep_size is None else [ep_size])  # one round
    groups = [
        (bridge.group(k.name, ep_size=ep_size) if k.grid == "expert" else bridge.group(k.name)).group
        for k in kinds
    ]
    mesh = torch.tensor(flat, dtype=torch.int).reshape(shape)
    _check_groups(mesh, groups, [n for _, n in pairs], bridge.rank)
    return DeviceMesh.from_group(groups, device_type, mesh=mesh, mesh_dim_names=tuple(n for _, n in pairs))


def _check_groups(mesh: torch.Tensor, groups: Sequence[Any], names: Sequence[str], rank: int) -> None:
    """Each group, in group-rank order, is this rank's slice of the mesh along its dim."""
    where = (mesh == rank).nonzero()
    if where.shape[0] != 1:
        raise BridgeError(f"rank {rank} is not in the mesh exactly once")
    coordinate = where[0].tolist()
    for axis, (group, name) in enumerate(zip(groups, names)):
        index = list(coordinate)
        index[axis] = slice(None)
        expected = mesh[tuple(index)].tolist()
        actual = list(dist.get_process_group_ranks(group))
        if actual != expected:
            raise BridgeError(
                f"the bridge's group for mesh dimension {name!r} on rank {rank} has ranks {actual} "
                f"(in group-rank order), but the layout gives {expected}"
            )


# -- import: a DeviceMesh read as an MPU ---------------------------------------------------

#: Root dimension names :class:`MeshMpu` reads: Megatron's and torchtitan's.
MESH_ROOT_NAMES: Tuple[str, ...] = ("pp", "dp", "dp_replicate", "dp_shard", "ep", "cp", "tp")
#: Flattened dimension names it reads (``mesh[...]._flatten(name)``); others are ignored.
MESH_FLAT_NAMES: Tuple[str, ...] = ("dp", "dp_cp", "dp_shard_cp", "ep", "edp", "etp")
_DATA_AXES = ("dp", "dp_replicate", "dp_shard")
#: MPU dimension -> the mesh dim names whose group it prefers when several hold its ranks.
_OWN_NAMES: Dict[str, Tuple[str, ...]] = {
    "tp": ("tp",), "pp": ("pp",), "cp": ("cp",), "dp": ("dp",), "sdp": ("dp_cp", "dp_shard_cp"),
    "ep": ("ep",), "etp": ("etp",), "edp": ("edp",),
}
#: MPU dimension -> megatron-core getter prefix.
_PREFIX = {
    "tp": "get_tensor_model_parallel",
    "pp": "get_pipeline_model_parallel",
    "cp": "get_context_parallel",
    "ep": "get_expert_model_parallel",
    "etp": "get_expert_tensor_parallel",
    "edp": "get_expert_data_parallel",
}


def _accepted() -> str:
    return (f"root dims {', '.join(MESH_ROOT_NAMES)}; flattened dims {', '.join(MESH_FLAT_NAMES)} "
            "(Megatron's tp, pp, dp, cp, ep and torchtitan's pp, dp_replicate, dp_shard, cp, tp, "
            "with flattened dp, dp_shard_cp, dp_cp, ep)")


def _check_ascending(
    tensor: torch.Tensor, names: Sequence[str], name: str, axes: Sequence[int], rank: int,
    flat: Optional[Tuple[int, ...]],
) -> None:
    """Every slice of the mesh along ``axes`` (row-major; a flattened dim's root axes, or one
    root dim) ascends, as the process group over it orders its ranks; else MpuError.

    A slice that runs backwards (``DeviceMesh("cpu", [[1, 0], [3, 2]], ("dp", "tp"))``) puts a
    rank at one place in the mesh (its coordinate, DTensor's shard index) and another in the
    group (``dist.get_rank(group)``, what collectives use), so no rank the bridge could report
    is right for both. Checked over the whole tensor, so every rank refuses alike."""
    from .errors import MpuError

    if not axes:  # a flattened dim no root axes give (torch flattens root dims): this rank's own
        slices = [list(flat or ())]
    else:
        rest = [a for a in range(tensor.dim()) if a not in axes]
        width = math.prod(tensor.shape[a] for a in axes)
        slices = tensor.permute(*rest, *axes).reshape(-1, width).tolist()
    bad = [s for s in slices if any(b <= a for a, b in zip(s, s[1:]))]
    if not bad:
        return
    shown = next((s for s in bad if rank in s), bad[0])
    through = rank if rank in shown else shown[0]
    kind = "flattened dim" if flat is not None else "dim"
    raise MpuError(
        f"the DeviceMesh's {name!r} slice through rank {through} is {shown} (mesh dims "
        f"{tuple(names)}), but its process group orders them {sorted(shown)} (torch orders a group "
        f"by global rank): rank {through} would be {name} rank {shown.index(through)} by the mesh and "
        f"{sorted(shown).index(through)} by the group, and {len(bad)} of the {len(slices)} slices of "
        f"this {kind} run out of order like that. mpu-bridge reports a group's own ranks, so it reads "
        f"only meshes whose slices ascend: build the mesh with every {name} slice in ascending order "
        f"(e.g. {sorted(shown)})"
    )


def _group_in_order(name: str, ranks: Tuple[int, ...], group: Any) -> Tuple[Tuple[int, ...], Any]:
    """``(ranks, group)`` of a mesh dim, once ``ranks`` is ``group``'s own order (the ranks the
    reader reports and the group it hands out must give every rank the same place); else MpuError."""
    from .errors import MpuError

    actual = tuple(int(r) for r in dist.get_process_group_ranks(group))
    if actual != ranks:
        raise MpuError(
            f"the DeviceMesh's {name!r} group holds ranks {list(actual)} in group order, but the mesh "
            f"slice through rank {dist.get_rank()} is {list(ranks)}; mpu-bridge reports a group's own "
            "ranks, so the mesh must list each slice in its group's order"
        )
    return ranks, group


class MeshMpu:
    """A ``DeviceMesh`` with named dims, read as a megatron-core-style MPU.

    ``attach(mesh)`` builds one, so the bridge's reader, order inference and borrowing
    work on the mesh's own groups. Root dims: ``tp``, ``pp``, ``cp``; data parallel as
    ``dp`` or torchtitan's ``dp_replicate`` × ``dp_shard``; ``ep`` as a root dim is
    carved out of data parallelism (dense data parallel = data dims × ep, expert data
    parallel = data dims × cp, expert-TP = TP), or a flattened dim (then the bridge
    derives expert data parallelism from the layout). Flattened dims (``dp``, ``dp_cp``,
    ``dp_shard_cp``, ``ep``, ``edp``, ``etp``) lend their groups wherever their ranks are
    a group's. A group no mesh dim holds is left for the bridge to create on request.
    The rank order is inferred from the mesh tensor (exposed as ``order``).

    Every dim it reads must list each slice ascending, the order its process group holds
    its ranks in (torch orders a group by global rank): the ranks it reports are then its
    groups' own, ``get_tensor_model_parallel_rank() == dist.get_rank(group)``. A mesh with a
    slice that runs backwards (``[[1, 0], [3, 2]]`` over ``("dp", "tp")``) is an MpuError on
    every rank, naming the slice.

    The reader reports it as the MPU flavour ``"device-mesh"`` (detected by class, see
    :func:`mpu_bridge.mpu.names.detect_flavour`), answered with megatron-core's getter
    names for the dims the mesh has. It has no record in ``compat/surfaces``: it exists
    only over a live mesh (``compat/README.md`` says why); ``tests/test_mesh.py`` reads
    real meshes instead.

    Example (every rank)::

        mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("pp", "dp", "tp"))
        bridge = mpu_bridge.attach(mesh)      # reads MeshMpu(mesh)
        bridge.reader.flavour                 # "device-mesh"
        bridge.tensor_parallel().group is mesh.get_group("tp")      # True
    """

    def __init__(self, mesh: DeviceMesh) -> None:
        from . import _torch
        from .errors import MpuError
        from .mpu.order import infer_order

        names = tuple(mesh.mesh_dim_names or ())
        if not names:
            raise MpuError(f"the DeviceMesh has no dim names; name its dims ({_accepted()})")
        unknown = [n for n in names if n not in MESH_ROOT_NAMES]
        if unknown:
            raise MpuError(f"the DeviceMesh has dims {', '.join(map(repr, unknown))} that mpu-bridge cannot "
                           f"read; accepted names: {_accepted()}")
        if "dp" in names and ("dp_replicate" in names or "dp_shard" in names):
            raise MpuError("the DeviceMesh names both 'dp' and 'dp_replicate'/'dp_shard' as root dims, "
                           f"which is ambiguous; use one or the other ({_accepted()})")
        world = dist.get_world_size()
        tensor = mesh.mesh
        if tensor.numel() != world or sorted(tensor.flatten().tolist()) != list(range(world)):
            raise MpuError(f"the DeviceMesh spans {tensor.numel()} ranks, not the world of {world}: "
                           "pass the world mesh (root mesh) itself")
        self.mesh = mesh
        self.dim_names = names
        self._rank = dist.get_rank()
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise MpuError(f"rank {self._rank} is not in the DeviceMesh")
        self._coordinate = list(coordinate)
        self._tensor = tensor
        # candidate groups: each root dim, each known flattened dim: name -> (ranks in group order, group)
        self._named: Dict[str, Tuple[Tuple[int, ...], Any]] = {}
        subs = {name: sub for name, sub in _torch.mesh_flattened(mesh).items() if name in MESH_FLAT_NAMES}
        flat = {name: tuple(int(r) for r in sub.mesh.flatten().tolist()) for name, sub in subs.items()}
        # every dim read must run its slices ascending, as its process group does (checked over
        # the whole mesh tensor, so every rank refuses alike), before any group is taken
        for axis, name in enumerate(names):
            _check_ascending(tensor, names, name, [axis], self._rank, None)
        for name, ranks in flat.items():
            _check_ascending(tensor, names, name, self._flattened_axes(ranks), self._rank, ranks)
            self._named[name] = _group_in_order(name, ranks, subs[name].get_group())
        for axis, name in enumerate(names):
            self._named[name] = _group_in_order(name, self._axes_ranks([axis]), mesh.get_group(name))
        self._dims = self._read_dims(names, flat)
        groups = {d: list(r) for d, r in self._dims.items() if d in ("tp", "cp", "dp", "pp", "ep", "etp", "edp")}
        self.order = infer_order(world, {}, groups)
        self._getters: Dict[str, Any] = {}
        self._build_getters()

    def __repr__(self) -> str:
        shape = ", ".join(f"{n}={s}" for n, s in zip(self.dim_names, self._tensor.shape))
        return f"MeshMpu({shape})"

    def _group(self, dim: str, ranks: Tuple[int, ...]) -> Any:
        """The mesh's group with exactly ``ranks`` (group order): the dim named like
        ``dim`` first, else any; None when no mesh dim holds them."""
        preferred = _OWN_NAMES.get(dim, ())
        for name in preferred + tuple(n for n in self._named if n not in preferred):
            entry = self._named.get(name)
            if entry is not None and entry[0] == ranks:
                return entry[1]
        return None

    def _axes_ranks(self, axes: Sequence[int]) -> Tuple[int, ...]:
        """This rank's ranks along ``axes`` (others fixed), row-major: slowest axis first."""
        index: List[Any] = list(self._coordinate)
        for axis in axes:
            index[axis] = slice(None)
        return tuple(int(r) for r in self._tensor[tuple(index)].flatten().tolist())

    def _group_ranks(self, axes: Sequence[int]) -> Tuple[int, ...]:
        """This rank's group over ``axes``, in group order: ascending, as every group torch or
        the bridge makes orders its members (the root axes ascend: checked at construction, so
        one axis is its slice; several are sorted, since their row-major walk need not ascend
        when the mesh lists a faster dim before a slower one)."""
        ranks = self._axes_ranks(axes)
        return ranks if len(axes) == 1 else tuple(sorted(ranks))

    def _flattened_axes(self, ranks: Tuple[int, ...]) -> List[int]:
        """The root axes whose row-major slice through this rank is the flattened dim ``ranks``
        (torch flattens a submesh of root dims in mesh order); [] when none is."""
        count = len(self._tensor.shape)
        for mask in range(1, 1 << count):
            axes = [axis for axis in range(count) if mask >> axis & 1]
            if self._axes_ranks(axes) == ranks:
                return axes
        return []

    def _read_dims(self, names: Tuple[str, ...], flat: Mapping[str, Tuple[int, ...]]) -> Dict[str, Tuple[int, ...]]:
        """MPU dimension -> this rank's group ranks (group order)."""
        axis = {n: i for i, n in enumerate(names)}
        data = [axis[n] for n in _DATA_AXES if n in axis]
        dims: Dict[str, Tuple[int, ...]] = {}
        for dim in ("tp", "pp", "cp"):
            dims[dim] = self._group_ranks([axis[dim]]) if dim in axis else (self._rank,)
        cp_axes = [axis["cp"]] if "cp" in axis else []
        if "ep" in axis:
            dims["dp"] = self._group_ranks(sorted(data + [axis["ep"]]))
            dims["sdp"] = self._group_ranks(sorted(data + [axis["ep"]] + cp_axes))
            dims["ep"] = self._group_ranks([axis["ep"]])
            dims["edp"] = self._group_ranks(sorted(data + cp_axes))
        else:
            dims["dp"] = self._group_ranks(sorted(data))
            dims["sdp"] = self._group_ranks(sorted(data + cp_axes))
            if "ep" in flat:
                dims["ep"] = flat["ep"]
        for name in ("edp", "etp"):
            if name in flat and "ep" in dims:
                dims[name] = flat[name]
        return dims

    def _build_getters(self) -> None:
        for dim, prefix in _PREFIX.items():
            if dim in self._dims:
                self._add(dim, prefix, self._dims[dim])
        dp, sdp = self._dims["dp"], self._dims["sdp"]
        dp_group, sdp_group = self._group("dp", dp), self._group("sdp", sdp)

        def pick(with_context_parallel: bool = False) -> Tuple[int, ...]:
            return sdp if with_context_parallel else dp

        def world_size(with_context_parallel: bool = False) -> int:
            return len(pick(with_context_parallel))

        def rank(with_context_parallel: bool = False) -> int:
            return pick(with_context_parallel).index(self._rank)

        def group(with_context_parallel: bool = False) -> Any:
            return sdp_group if with_context_parallel else dp_group

        def ranks() -> List[int]:
            return list(dp)

        self._getters.update({
            "get_data_parallel_world_size": world_size,
            "get_data_parallel_rank": rank,
            "get_data_parallel_group_ranks": ranks,
        })
        if dp_group is not None or sdp_group is not None:
            self._getters["get_data_parallel_group"] = group

    def _add(self, dim: str, prefix: str, ranks: Tuple[int, ...]) -> None:
        self._getters[f"{prefix}_world_size"] = lambda: len(ranks)
        self._getters[f"{prefix}_rank"] = lambda: ranks.index(self._rank)
        self._getters[f"{prefix}_group_ranks"] = lambda: list(ranks)
        group = self._group(dim, ranks)
        if group is not None:
            self._getters[f"{prefix}_group"] = lambda: group

    def __getattr__(self, name: str) -> Any:
        getters = self.__dict__.get("_getters", {})
        if name in getters:
            return getters[name]
        raise AttributeError(name)

    def __dir__(self) -> List[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_getters", {})))
