"""megatron-core's ``HyperCommGrid`` read as the layout (``attach(grid)``).

A trainer on Megatron-Bridge's decentralized process groups has no ``parallel_state``:
it builds a ``HyperCommGrid`` and creates the groups it wants with ``grid.create_pg``.
A grid *is* a layout: its ``shape`` and ``dim_names`` are megatron-core's sizes and rank
order (``dim_names`` is the ``order`` argument, fastest first). So ``attach(grid)``
plans that layout with the same arithmetic as a standalone bridge, borrows every group
the grid has already created (each checked against the layout: nothing is created for
a rank set the grid holds), and derives the rest on request.

What a grid must be: its dims are megatron-core's dense tokens (``tp``, ``cp``, ``dp``,
``pp``, and 0.19's ``gtp_remat``); an expert grid (with ``ep``) is refused, saying so.
A grid over part of the world (``rank_offset``, fewer ranks than the world: one module of
a multi-module layout) is a rank span: as every rank of the world builds every module's
grid (``create_pg`` makes each enter every group), every rank attaches it, its members
get its groups and the others an :class:`~mpu_bridge.errors.OutsideSpanError`. Groups
the grid creates *after* ``attach`` are not seen: attach once the grid's groups exist.
Groups of a registered view (megatron-core 0.19) are borrowed by their rank sets (a
derived group with the same ranks is that group), not read as kinds.

Example (every rank, 8 ranks)::

    grid = HyperCommGrid([2, 1, 4, 1], ["tp", "cp", "dp", "pp"])
    tp = grid.create_pg("tp")
    bridge = mpu_bridge.attach(grid)
    bridge.tensor_parallel().group is tp      # True: borrowed
    bridge.group("tp-dp").ranks               # derived, (0, 1, ..., 7)
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from .errors import MpuError
from .kinds import GTP, KIND_TABLE, Kind
from .layout import Layout, plan

__all__ = ["is_grid", "grid_layout", "grid_groups", "grid_group_keys", "kind_of_dims"]

#: The dims a grid may name: megatron-core's dense order tokens.
DENSE_DIMS = ("tp", "cp", "dp", "pp", GTP)


def is_grid(obj: Any) -> bool:
    """Whether ``obj`` is megatron-core's ``HyperCommGrid`` (by class, without importing it)."""
    cls = type(obj)
    return cls.__name__ == "HyperCommGrid" and cls.__module__.startswith("megatron.core")


def grid_layout(grid: Any, world_size: int) -> Layout:
    """The layout a grid describes, over its ranks ``rank_offset ..`` (pure; MpuError for a
    grid that is not a dense layout inside the world).
    Example: ``grid_layout(HyperCommGrid([2, 4], ["tp", "dp"]), 8).config.tp == 2``."""
    shape, names = [int(s) for s in grid.shape], [str(n) for n in grid.dim_names]
    offset, size = int(grid.rank_offset), 1
    for s in shape:
        size *= s
    if offset < 0 or offset + size > world_size:
        raise MpuError(
            f"the HyperCommGrid covers ranks [{offset}, {offset + size}), outside the world of {world_size} ranks"
        )
    unknown = [n for n in names if n not in DENSE_DIMS]
    if unknown or len(set(names)) != len(names):
        raise MpuError(
            f"the HyperCommGrid's dims {names} are not megatron-core's dense dims "
            f"({', '.join(DENSE_DIMS)}, each once)"
            + ("; an expert grid (with 'ep') is not supported yet" if "ep" in unknown else "")
        )
    sizes = dict(zip(names, shape))
    return plan(size, order="-".join(names), tp=sizes.get("tp", 1), cp=sizes.get("cp", 1),
                pp=sizes.get("pp", 1), gtp_remat=sizes.get(GTP, 1), rank_offset=offset)


def kind_of_dims(dims: Tuple[str, ...]) -> Optional[Kind]:
    """The dense kind whose groups vary exactly ``dims`` (the GTP axis counts when named);
    None for a combination the kind table has no kind for. Example: ``kind_of_dims(("dp", "cp")).name == "dp-cp"``."""
    wanted = set(dims)
    for kind in KIND_TABLE:
        if kind.grid != "dense" or kind.listed == "ag":
            continue
        tokens = set(kind.tokens)
        if tokens == wanted or (GTP not in wanted and tokens - {GTP} == wanted and GTP in tokens):
            return kind
    return None


def grid_group_keys(grid: Any) -> Tuple[Tuple[str, Tuple[str, ...]], ...]:
    """``(view, dims)`` of every group family the grid has created, whether this rank is in
    one of its groups or not (the same on every rank). Example: ``(("", ("tp",)),)``."""
    out = []
    for key in vars(grid).get("_pgs") or {}:
        if isinstance(key, str):
            out.append(("", tuple(key.split("-"))))
        elif isinstance(key, tuple) and len(key) == 2:
            out.append((str(key[0]), tuple(key[1])))
    return tuple(out)


def grid_groups(grid: Any) -> Dict[Tuple[str, Tuple[str, ...]], Any]:
    """The groups the grid has created (this rank's group of each), keyed ``(view, dims)``:
    view ``""`` for the grid's own dims, a view's name for megatron-core 0.19's
    ``register_view`` factorizations. Read from the grid's own table (``vars()``: no method
    lists them). Example: ``{("", ("dp", "cp")): group, ("expert", ("ep",)): group}``."""
    import torch.distributed as dist  # only a process that made a grid calls this

    out: Dict[Tuple[str, Tuple[str, ...]], Any] = {}
    outside = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", None)
    for key, group in (vars(grid).get("_pgs") or {}).items():
        if group is None or (outside is not None and group is outside):
            continue  # a rank outside the grid's span holds none of its groups
        if isinstance(key, str):
            out["", tuple(key.split("-"))] = group
        elif isinstance(key, tuple) and len(key) == 2:
            out[str(key[0]), tuple(key[1])] = group
    return out
