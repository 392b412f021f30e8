"""Pure rank arithmetic: which ranks share each kind of process group.

No torch here. A :class:`Layout` answers, for every group kind, the rank lists
megatron-core's ``initialize_model_parallel`` would build for the same sizes and
order string, and finds one rank's group by arithmetic, without enumerating the
world.

Semantics (megatron-core's ``RankGenerator``):

* the order string lists the dimensions, first token varying fastest
  (default ``tp-cp-ep-dp-pp``); tokens it leaves out are appended with size 1,
  and leaving out a token whose size is not 1 is an error;
* the *dense* grid has sizes tp, cp, dp, pp (ep = 1);
* the *expert* grid has sizes etp (default tp), ep, edp = world / (etp·ep·pp),
  pp (cp = 1: context parallelism folds into expert data parallelism), read
  through the same order string;
* megatron-core 0.19's Generalized Tensor Parallelism adds a ``gtp_remat`` axis
  (size ``gtp_remat`` in the dense grid, ``expert_gtp_remat`` in the expert grid).
  Unless the order string names it, it goes right after ``tp`` in the dense grid
  and right after ``ep`` in the expert grid, as megatron-core injects it; it is a
  model-parallel axis, so dp = world / (tp·gtp_remat·cp·pp) is the *replicate*
  degree. At size 1 (the default, and every release before 0.19) it changes nothing.

Example::

    >>> layout = plan(16, tp=2, ep=4)
    >>> layout.groups("ep")[:2]
    [[0, 2, 4, 6], [1, 3, 5, 7]]
    >>> layout.group_of("edp", 5)
    [5, 13]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

from .errors import LayoutError
from .groupview import GroupView, partition_fits_nodes
from .kinds import KINDS as KIND_ROWS
from .kinds import Kind
from .validate import integer, optional_bool, optional_count, positive_int

__all__ = [
    "DEFAULT_ORDER",
    "TOKENS",
    "GTP",
    "ORDER_TOKENS",
    "KINDS",
    "KindSpec",
    "RankGrid",
    "ParallelConfig",
    "Layout",
    "plan",
    "expert_order",
    "inject_gtp",
]

#: The dimension tokens of megatron-core's order string (every release).
TOKENS: Tuple[str, ...] = ("tp", "cp", "ep", "dp", "pp")

#: megatron-core 0.19's Generalized Tensor Parallelism axis (weight rematerialisation).
GTP = "gtp_remat"

#: Every token an order string may name: :data:`TOKENS` and the GTP axis.
ORDER_TOKENS: Tuple[str, ...] = TOKENS + (GTP,)

#: megatron-core's default order: tensor fastest, pipeline slowest.
DEFAULT_ORDER = "tp-cp-ep-dp-pp"

_TOKEN_NAMES = {
    "tp": "tensor-parallel",
    "cp": "context-parallel",
    "ep": "expert-parallel",
    "dp": "data-parallel",
    "pp": "pipeline-parallel",
    GTP: "generalized tensor-parallel (gtp_remat)",
}


#: What a group kind is (its grid, varying tokens, description and other names):
#: one row of :data:`mpu_bridge.kinds.KIND_TABLE`.
KindSpec = Kind

#: Every group kind a :class:`Layout` answers, in a fixed order.
KINDS: Mapping[str, KindSpec] = KIND_ROWS


def _positive_int(name: str, value: Any) -> int:
    """``value`` as a positive int; integer types (numpy's too) only, never bool or float."""
    return positive_int(name, value, LayoutError)


def _parse_order(order: Any) -> Tuple[str, ...]:
    if not isinstance(order, str):
        raise LayoutError(
            f"order must be a string such as {DEFAULT_ORDER!r}, got {order!r} ({type(order).__name__})"
        )
    tokens = tuple(order.strip().lower().split("-"))
    seen = set()
    for token in tokens:
        if token not in ORDER_TOKENS:
            raise LayoutError(
                f"order {order!r} has unknown token {token!r}; "
                f"known tokens are {', '.join(ORDER_TOKENS)} (joined by '-', e.g. {DEFAULT_ORDER!r})"
            )
        if token in seen:
            raise LayoutError(
                f"order {order!r} names {token!r} twice; name each of {', '.join(ORDER_TOKENS)} at most once"
            )
        seen.add(token)
    return tokens


def inject_gtp(order: str, after: str) -> str:
    """``order`` with the GTP axis placed as megatron-core 0.19 places it: kept where the
    order names it, else right after ``after`` (``"tp"`` for the dense grid, ``"ep"`` for
    the expert grid; ``"tp"`` when ``after`` is absent; first when both are).

    Example: ``inject_gtp("tp-cp-ep-dp-pp", "ep") == "tp-cp-ep-gtp_remat-dp-pp"``.
    """
    tokens = list(_parse_order(order))
    if GTP in tokens:
        return "-".join(tokens)
    anchor = after if after in tokens else "tp"
    tokens.insert(tokens.index(anchor) + 1 if anchor in tokens else 0, GTP)
    return "-".join(tokens)


def _products(values: Tuple[int, ...]) -> Tuple[int, ...]:
    """Exclusive prefix products: ``(1, v0, v0*v1, ...)`` without the total."""
    out = []
    running = 1
    for v in values:
        out.append(running)
        running *= v
    return tuple(out)


#: Groups of at most this many ranks keep their offsets with their cached geometry.
_KEEP_OFFSETS = 1 << 16


def _expand(dims: Tuple[Tuple[int, int], ...]) -> List[int]:
    """All sums ``sum(i_k * stride_k)`` over ``dims = ((size, stride), ...)``, first dim fastest."""
    values = [0]
    for size, stride in dims:
        values = [i * stride + v for i in range(size) for v in values]
    return values


@dataclass(frozen=True)
class _Geometry:
    """How one kind cuts a grid: the varying (masked) and fixed (unmasked) dimensions."""

    masked: Tuple[Tuple[int, int], ...]  # (size, stride) of dims that vary inside a group
    unmasked: Tuple[Tuple[int, int], ...]  # (size, stride) of dims that pick the group

    @property
    def offsets(self) -> Tuple[int, ...]:
        """Member offsets from the group's smallest rank, ascending: O(group size), so kept
        only for groups of at most ``_KEEP_OFFSETS`` ranks (geometries are cached)."""
        kept = self.__dict__.get("_offsets")
        if kept is not None:
            return kept
        offsets = tuple(_expand(self.masked))
        if len(offsets) <= _KEEP_OFFSETS:
            self.__dict__["_offsets"] = offsets  # frozen: bypass __setattr__ for the memo only
        return offsets

    @property
    def group_size(self) -> int:
        return math.prod(size for size, _ in self.masked)

    def view(self, base: int) -> GroupView:
        """The group whose smallest rank is ``base``, described, not listed."""
        return GroupView(base, self.masked)

    @property
    def num_groups(self) -> int:
        return math.prod(size for size, _ in self.unmasked)

    def base_of_rank(self, rank: int) -> int:
        return rank - sum(((rank // stride) % size) * stride for size, stride in self.masked)

    def index_of_rank(self, rank: int) -> int:
        index, scale = 0, 1
        for size, stride in self.unmasked:
            index += ((rank // stride) % size) * scale
            scale *= size
        return index

    def base_of_index(self, index: int) -> int:
        base = 0
        for size, stride in self.unmasked:
            base += (index % size) * stride
            index //= size
        return base


@dataclass(frozen=True)
class RankGrid:
    """An orthogonal grid of ranks: megatron-core's ``RankGenerator`` as pure arithmetic.

    ``order`` lists every token (missing ones appended, size 1) and ``sizes`` their
    sizes, first token varying fastest. Build one with :meth:`build`.

    Example::

        >>> grid = RankGrid.build(tp=2, dp=2, pp=2, order="tp-dp-pp")
        >>> grid.groups(("dp",))
        [[0, 2], [1, 3], [4, 6], [5, 7]]
    """

    order: Tuple[str, ...]
    sizes: Tuple[int, ...]
    strides: Tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", _products(self.sizes))

    @classmethod
    def build(
        cls,
        *,
        tp: int = 1,
        cp: int = 1,
        ep: int = 1,
        dp: int = 1,
        pp: int = 1,
        gtp_remat: int = 1,
        order: str = DEFAULT_ORDER,
        names: Optional[Mapping[str, str]] = None,
    ) -> "RankGrid":
        """Validate sizes and order like megatron-core and return the grid.

        ``names`` maps a token to the name used in error messages (the expert grid
        calls its ``tp`` token ``etp``).
        """
        names = dict(names or {})
        raw = {"tp": tp, "cp": cp, "ep": ep, "dp": dp, "pp": pp, GTP: gtp_remat}
        sizes = {t: _positive_int(names.get(t, t), v) for t, v in raw.items()}
        if sizes["ep"] > 1 and sizes["cp"] > 1:
            raise LayoutError(
                f"ep = {sizes['ep']} and cp = {sizes['cp']} in one rank grid: megatron-core keeps "
                "context parallelism in the dense grid and expert parallelism in the expert grid; "
                "use plan(..., cp=..., ep=...), which builds both grids"
            )
        tokens = _parse_order(order)
        for token in ORDER_TOKENS:
            if token not in tokens and sizes[token] != 1:
                label = names.get(token, token)
                raise LayoutError(
                    f"order {order!r} does not name {token!r}, but the {_TOKEN_NAMES[token]} size "
                    f"{label} = {sizes[token]}; add {token!r} to the order (default {DEFAULT_ORDER!r})"
                )
        # The GTP axis stays out of a grid whose order does not name it (its size is 1 then).
        full = tokens + tuple(t for t in TOKENS if t not in tokens)
        return cls(order=full, sizes=tuple(sizes[t] for t in full))

    @property
    def world_size(self) -> int:
        return math.prod(self.sizes)

    def size_of(self, token: str) -> int:
        """The size of ``token``'s dimension (1 for the GTP axis when the grid has none)."""
        if _check_token(token) not in self.order:
            return 1
        return self.sizes[self.order.index(token)]

    def stride_of(self, token: str) -> int:
        """The stride of ``token``'s dimension (the world size for an absent GTP axis)."""
        if _check_token(token) not in self.order:
            return self.world_size
        return self.strides[self.order.index(token)]

    def geometry(self, tokens: Tuple[str, ...]) -> _Geometry:
        return _geometry(self, _check_tokens(tokens))

    def groups(self, tokens: Tuple[str, ...]) -> List[List[int]]:
        """Every group in megatron-core's order; each group ascending."""
        geo = self.geometry(tokens)
        offsets = geo.offsets
        return [[base + o for o in offsets] for base in _expand(geo.unmasked)]

    def group_of(self, tokens: Tuple[str, ...], rank: int) -> List[int]:
        """The group over ``tokens`` that holds ``rank``.

        Example: ``RankGrid.build(tp=2).group_of(("tp",), 1) == [0, 1]``.
        """
        geo = self.geometry(tokens)
        base = geo.base_of_rank(_check_rank(rank, self.world_size))
        return [base + o for o in geo.offsets]


def _check_token(token: Any) -> str:
    if not isinstance(token, str) or token not in ORDER_TOKENS:
        raise LayoutError(f"unknown dimension token {token!r}; known tokens: {', '.join(ORDER_TOKENS)}")
    return token


def _check_tokens(tokens: Any) -> frozenset:
    """``tokens`` (an iterable of dimension tokens, not one string) as a frozenset."""
    if isinstance(tokens, str):
        raise LayoutError(
            f"tokens must be a tuple of dimension tokens such as ('tp', 'dp'), got the string {tokens!r}"
        )
    try:
        items = tuple(tokens)
    except TypeError:
        raise LayoutError(
            f"tokens must be a tuple of dimension tokens such as ('tp', 'dp'), got {tokens!r} "
            f"({type(tokens).__name__})"
        ) from None
    return frozenset(_check_token(token) for token in items)


def _check_rank(rank: Any, world_size: int) -> int:
    """``rank`` as an int in ``0..world_size-1`` (numpy integers too; never bool or float)."""
    rank = integer("rank", rank, LayoutError)
    if not 0 <= rank < world_size:
        raise LayoutError(
            f"rank {rank} is outside the world of {world_size} ranks (0..{world_size - 1})"
        )
    return rank


@functools.lru_cache(maxsize=256)
def _geometry(grid: RankGrid, tokens: frozenset) -> _Geometry:
    masked = tuple(
        (size, stride)
        for token, size, stride in zip(grid.order, grid.sizes, grid.strides)
        if token in tokens
    )
    unmasked = tuple(
        (size, stride)
        for token, size, stride in zip(grid.order, grid.sizes, grid.strides)
        if token not in tokens
    )
    return _Geometry(masked=masked, unmasked=unmasked)


@dataclass(frozen=True)
class ParallelConfig:
    """Validated parallel sizes. ``dp`` and ``edp`` are derived; ``etp`` defaults to ``tp``.

    ``gtp_remat`` / ``expert_gtp_remat`` are megatron-core 0.19's Generalized Tensor
    Parallelism sizes (dense and expert grid, independent, default 1): model-parallel
    axes, so ``dp`` and ``edp`` are the replicate degrees.

    ``rank_offset`` (megatron-core's, with ``world_size`` as its ``local_world_size``):
    the layout covers global ranks ``rank_offset .. rank_offset + world_size - 1`` (a
    *rank span*: one module of a multi-module trainer); every group is the 0-based
    layout's group shifted by it. Default 0: the layout is the world.

    Example::

        >>> cfg = ParallelConfig(64, tp=2, pp=2, ep=4)
        >>> (cfg.dp, cfg.edp)
        (16, 4)
        >>> ParallelConfig(8, tp=2, gtp_remat=2).dp
        2
    """

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None
    order: str = DEFAULT_ORDER
    gpus_per_node: Optional[int] = None
    gtp_remat: int = 1
    expert_gtp_remat: int = 1
    rank_offset: int = 0

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        offset = integer("rank_offset", self.rank_offset, LayoutError)
        if offset < 0:
            raise LayoutError(f"rank_offset must be an integer >= 0 (the layout's first global rank), got {offset}")
        set_("rank_offset", offset)
        world = _positive_int("world_size", self.world_size)
        tp = _positive_int("tp", self.tp)
        pp = _positive_int("pp", self.pp)
        cp = _positive_int("cp", self.cp)
        ep = _positive_int("ep", self.ep)
        etp = tp if self.etp is None else _positive_int("etp", self.etp)
        gtp = _positive_int("gtp_remat", self.gtp_remat)
        egtp = _positive_int("expert_gtp_remat", self.expert_gtp_remat)
        _parse_order(self.order)
        set_("world_size", world)
        set_("tp", tp)
        set_("pp", pp)
        set_("cp", cp)
        set_("ep", ep)
        set_("etp", etp)
        set_("gtp_remat", gtp)
        set_("expert_gtp_remat", egtp)
        set_("order", self.order.strip().lower())

        dense = tp * pp * cp * gtp
        if world % dense:
            with_gtp = f", gtp_remat={gtp}" if gtp > 1 else ""
            product = "tp·pp·cp·gtp_remat" if gtp > 1 else "tp·pp·cp"
            raise LayoutError(
                f"world size {world} is not divisible by {product} = {dense} "
                f"(tp={tp}, pp={pp}, cp={cp}{with_gtp}); choose sizes whose product divides the world"
            )
        expert = etp * ep * pp * egtp
        if world % expert:
            hint = ""
            if etp == tp and egtp == 1 and gtp == 1:
                hint = f"; equivalently dp·cp = {world // (tp * pp)} is not divisible by ep = {ep}"
            with_egtp = f", expert_gtp_remat={egtp}" if egtp > 1 else ""
            product = "etp·ep·pp·expert_gtp_remat" if egtp > 1 else "etp·ep·pp"
            raise LayoutError(
                f"world size {world} is not divisible by {product} = {expert} "
                f"(etp={etp}, ep={ep}, pp={pp}{with_egtp}){hint}; choose an ep (or etp) that divides it"
            )
        if self.gpus_per_node is not None:
            gpn = _positive_int("gpus_per_node", self.gpus_per_node)
            if world % gpn:
                raise LayoutError(
                    f"world size {world} is not divisible by gpus_per_node = {gpn}: "
                    "the last node would be partial"
                )
            set_("gpus_per_node", gpn)
        if pp > 1 and not self.order.endswith("pp") and self.edp != self.dp:
            raise LayoutError(
                f"order {self.order!r} does not put pp last while pp = {pp}; megatron-core allows "
                f"that only when the expert data-parallel size equals the data-parallel size, "
                f"but edp = {self.edp} and dp = {self.dp}; put 'pp' last or make etp·ep = tp·cp"
            )

    @property
    def dp(self) -> int:
        """Data-parallel (replicate) size: world / (tp·pp·cp·gtp_remat)."""
        return self.world_size // (self.tp * self.pp * self.cp * self.gtp_remat)

    @property
    def edp(self) -> int:
        """Expert data-parallel (replicate) size: world / (etp·ep·pp·expert_gtp_remat)."""
        return self.world_size // (self.etp * self.ep * self.pp * self.expert_gtp_remat)  # type: ignore[operator]

    def grid_order(self, grid: str) -> str:
        """The order string one grid is read through: :attr:`order` with the GTP axis
        injected where megatron-core 0.19 puts it (see :func:`inject_gtp`) when the grid's
        GTP size is above 1 or the order names the axis; else :attr:`order` itself.

        Example: ``ParallelConfig(8, tp=2, gtp_remat=2).grid_order("dense") == "tp-gtp_remat-cp-ep-dp-pp"``.
        """
        size = self.gtp_remat if grid == "dense" else self.expert_gtp_remat
        if size == 1 and GTP not in self.order.split("-"):
            return self.order
        return inject_gtp(self.order, "tp" if grid == "dense" else "ep")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "world_size": self.world_size,
            "tp": self.tp,
            "pp": self.pp,
            "cp": self.cp,
            "ep": self.ep,
            "etp": self.etp,
            "dp": self.dp,
            "edp": self.edp,
            "order": self.order,
            "gpus_per_node": self.gpus_per_node,
            "gtp_remat": self.gtp_remat,
            "expert_gtp_remat": self.expert_gtp_remat,
            **({"rank_offset": self.rank_offset} if self.rank_offset else {}),
        }


@dataclass(frozen=True)
class Layout:
    """Every group kind of one configuration, as rank lists.

    Groups come in megatron-core's enumeration order (identical on every rank),
    each sorted ascending. ``group_of`` is pure arithmetic: O(group size), whatever
    the world size; ``group_view`` / ``group_view_of`` describe a group without listing
    it (:class:`~mpu_bridge.groupview.GroupView`, O(dimensions)), and sizes, counts and
    ``intra_node`` cost O(dimensions) too.
    """

    config: ParallelConfig
    dense: RankGrid = field(init=False, repr=False, compare=False)
    expert: RankGrid = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = self.config
        if not isinstance(c, ParallelConfig):
            raise LayoutError(
                f"Layout needs a ParallelConfig, got {c!r} ({type(c).__name__}); "
                "use plan(world_size, tp=..., ...) to build a layout from sizes"
            )
        dense = RankGrid.build(
            tp=c.tp, cp=c.cp, ep=1, dp=c.dp, pp=c.pp, gtp_remat=c.gtp_remat, order=c.grid_order("dense")
        )
        expert = RankGrid.build(
            tp=c.etp,  # type: ignore[arg-type]
            cp=1,
            ep=c.ep,
            dp=c.edp,
            pp=c.pp,
            gtp_remat=c.expert_gtp_remat,
            order=c.grid_order("expert"),
            names={"tp": "etp", "dp": "edp", GTP: "expert_gtp_remat"},
        )
        if c.pp > 1 and dense.stride_of("pp") != expert.stride_of("pp"):
            raise LayoutError(
                f"order {c.order!r} gives different pipeline groups to the dense grid "
                f"(stride {dense.stride_of('pp')}) and the expert grid (stride "
                f"{expert.stride_of('pp')}); megatron-core requires them equal: "
                f"put 'pp' last or make etp = tp (etp={c.etp}, tp={c.tp})"
            )
        object.__setattr__(self, "dense", dense)
        object.__setattr__(self, "expert", expert)

    # -- sizes -----------------------------------------------------------------

    @property
    def world_size(self) -> int:
        """How many ranks the layout covers (megatron-core's ``local_world_size`` for a span)."""
        return self.config.world_size

    @property
    def rank_offset(self) -> int:
        """The layout's first global rank (0 unless it is a rank span)."""
        return self.config.rank_offset

    @property
    def ranks(self) -> range:
        """The global ranks the layout covers: ``range(rank_offset, rank_offset + world_size)``."""
        return range(self.rank_offset, self.rank_offset + self.world_size)

    def holds(self, rank: int) -> bool:
        """Whether global ``rank`` is one of the layout's ranks (a span leaves the others out)."""
        return self.rank_offset <= rank < self.rank_offset + self.world_size

    @property
    def kinds(self) -> Tuple[str, ...]:
        """The kinds this layout lists, in a fixed order: every kind of the table except the
        all-gather twins, and the GTP kinds only when their grid's GTP size is above 1
        (:meth:`groups` and the other queries answer every kind of the table)."""
        c = self.config
        gtp = {"dense": c.gtp_remat > 1, "expert": c.expert_gtp_remat > 1}
        return tuple(
            name for name, k in KINDS.items() if k.listed == "always" or (k.listed == "gtp" and gtp[k.grid])
        )

    def spec(self, kind: str) -> KindSpec:
        try:
            return KINDS[kind]
        except (KeyError, TypeError):
            raise LayoutError(
                f"unknown group kind {kind!r}; known kinds: {', '.join(KINDS)}"
            ) from None

    def _grid(self, spec: KindSpec) -> RankGrid:
        return self.dense if spec.grid == "dense" else self.expert

    def _geometry(self, kind: str) -> _Geometry:
        spec = self.spec(kind)
        return self._grid(spec).geometry(spec.tokens)

    def size(self, kind: str) -> int:
        """Number of ranks in each group of ``kind``."""
        return self._geometry(kind).group_size

    def num_groups(self, kind: str) -> int:
        """Number of groups of ``kind`` (world size / group size)."""
        return self._geometry(kind).num_groups

    # -- groups ----------------------------------------------------------------

    def groups(self, kind: str) -> List[List[int]]:
        """All groups of ``kind`` (a fresh list), e.g. ``plan(8, tp=2).groups("tp")[:2] == [[0, 1], [2, 3]]``."""
        spec = self.spec(kind)
        groups = self._grid(spec).groups(spec.tokens)
        if self.rank_offset:
            groups = [[self.rank_offset + r for r in group] for group in groups]
        return groups

    def iter_groups(self, kind: str) -> Iterator[List[int]]:
        """The groups of ``kind`` one at a time, in the order of :meth:`groups` (kind checked now)."""
        geo = self._geometry(kind)

        def generate() -> Iterator[List[int]]:
            offsets = geo.offsets
            shift = self.rank_offset
            for index in range(geo.num_groups):
                base = geo.base_of_index(index) + shift
                yield [base + o for o in offsets]

        return generate()

    def group(self, kind: str, index: int) -> List[int]:
        """The ``index``-th group of ``kind`` in enumeration order."""
        geo = self._geometry(kind)
        base = geo.base_of_index(self._check_index(kind, geo, index)) + self.rank_offset
        return [base + o for o in geo.offsets]

    def _check_index(self, kind: str, geo: _Geometry, index: Any) -> int:
        try:
            number: Optional[int] = integer("group index", index, LayoutError)
        except LayoutError:
            number = None
        if number is None or not 0 <= number < geo.num_groups:
            raise LayoutError(
                f"group index {index!r} is outside 0..{geo.num_groups - 1} for kind {kind!r}"
            )
        return number

    def _check_rank(self, rank: Any) -> int:
        """``rank`` (global) checked to be one of the layout's, as its 0-based place in them."""
        if not self.rank_offset:
            return _check_rank(rank, self.world_size)
        rank = integer("rank", rank, LayoutError)
        if not self.holds(rank):
            raise LayoutError(
                f"rank {rank} is outside this layout's ranks {self.rank_offset}..{self.ranks[-1]} "
                f"(rank_offset {self.rank_offset}, {self.world_size} ranks)"
            )
        return rank - self.rank_offset

    def group_of(self, kind: str, rank: int) -> List[int]:
        """The group of ``kind`` that holds ``rank``, ascending; computed, not looked up."""
        geo = self._geometry(kind)
        base = geo.base_of_rank(self._check_rank(rank)) + self.rank_offset
        return [base + o for o in geo.offsets]

    def group_view(self, kind: str, index: int) -> GroupView:
        """The ``index``-th group of ``kind``, described by its geometry: O(1) in its size.

        Example: ``plan(2 ** 40, tp=8).group_view("dp", 1).first(3) == [1, 9, 17]``.
        """
        geo = self._geometry(kind)
        return geo.view(geo.base_of_index(self._check_index(kind, geo, index)) + self.rank_offset)

    def group_view_of(self, kind: str, rank: int) -> GroupView:
        """The group of ``kind`` that holds ``rank``, described by its geometry (see :meth:`group_view`).

        Example: ``plan(16, tp=2).group_view_of("dp", 5).first(8) == [1, 3, 5, 7, 9, 11, 13, 15]``.
        """
        geo = self._geometry(kind)
        return geo.view(geo.base_of_rank(self._check_rank(rank)) + self.rank_offset)

    def group_index(self, kind: str, rank: int) -> int:
        """Position of ``rank``'s group in :meth:`groups` order."""
        geo = self._geometry(kind)
        return geo.index_of_rank(self._check_rank(rank))

    def rank_in_group(self, kind: str, rank: int) -> int:
        """``rank``'s position inside its group of ``kind``."""
        geo = self._geometry(kind)
        rank = self._check_rank(rank)
        position, scale = 0, 1
        for size, stride in geo.masked:
            position += ((rank // stride) % size) * scale
            scale *= size
        return position

    # -- nodes -----------------------------------------------------------------

    def intra_node(self, kind: str) -> bool:
        """Whether every group of ``kind`` stays inside one node (needs ``gpus_per_node``).

        Ranks ``n*g .. n*g + g-1`` form node ``n``. Every group lies in an aligned block
        of ``Q`` ranks (its slowest varying dimension's size times stride), and all groups
        stay in one node exactly when ``Q`` divides ``g``
        (:func:`~mpu_bridge.groupview.partition_fits_nodes`): O(dims), whatever the sizes.
        """
        gpn = self.config.gpus_per_node
        if gpn is None:
            raise LayoutError(
                "intra_node needs gpus_per_node; pass plan(..., gpus_per_node=8) for 8 GPUs per node"
            )
        geo = self._geometry(kind)
        if self.rank_offset % gpn == 0:  # node-aligned: the blocks' rule holds as for the world
            return partition_fits_nodes(geo.masked, gpn)
        last = sum((size - 1) * stride for size, stride in geo.masked)
        return all(  # a span not aligned to nodes: each group's first and last member
            (base + self.rank_offset) // gpn == (base + self.rank_offset + last) // gpn
            for base in map(geo.base_of_index, range(geo.num_groups))
        )

    def node_of(self, rank: int) -> int:
        """The node of global ``rank`` (ranks ``n·g .. n·g + g-1`` form node ``n``)."""
        gpn = self.config.gpus_per_node
        if gpn is None:
            raise LayoutError("node_of needs gpus_per_node; pass plan(..., gpus_per_node=8)")
        return (self._check_rank(rank) + self.rank_offset) // gpn

    # -- export ----------------------------------------------------------------

    def to_dict(
        self,
        *,
        max_groups: Optional[int] = 8,
        max_members: Optional[int] = None,
        max_ranks: Optional[int] = None,
    ) -> Dict[str, Any]:
        """A JSON-ready description: the config and, per kind, sizes and groups.

        ``max_groups`` bounds the groups listed per kind (``None``: all of them);
        ``"truncated"`` says whether some were left out. ``max_members`` lists only the
        first members of larger groups; such an entry adds ``"members_truncated": True``
        and ``"shape"``, the ``[count, step]`` dimensions every group is laid out by
        (members ``first + Σ i·step``). ``max_ranks`` bounds the ranks listed per kind
        (one group at least). Limits are None or integers >= 0 (``max_members`` >= 1).

        Example: ``plan(64, tp=8).to_dict(max_members=2)["kinds"]["dp"]["groups"][0] == [0, 8]``.
        """
        max_groups = optional_count("max_groups", max_groups)
        max_ranks = optional_count("max_ranks", max_ranks)
        if max_members is not None:
            max_members = positive_int("max_members", max_members, LayoutError)
        kinds: Dict[str, Any] = {}
        for kind in self.kinds:
            geo = self._geometry(kind)
            count, size = geo.num_groups, geo.group_size
            listed = size if max_members is None else min(size, max_members)
            shown = count if max_groups is None else min(count, max_groups)
            if max_ranks is not None and shown:
                shown = min(shown, max(1, max_ranks // listed))
            offsets = geo.offsets if listed == size else GroupView(0, geo.masked).first(listed)
            bases = (geo.base_of_index(index) + self.rank_offset for index in range(shown))
            entry: Dict[str, Any] = {
                "description": KINDS[kind].description,
                "size": size,
                "num_groups": count,
                "groups": [[base + o for o in offsets] for base in bases],
                "truncated": shown < count,
            }
            if listed < size:
                entry["members_truncated"] = True
                entry["shape"] = [list(dim) for dim in GroupView(0, geo.masked).dims]
            if self.config.gpus_per_node is not None:
                entry["intra_node"] = self.intra_node(kind)
            kinds[kind] = entry
        return {"config": self.config.to_dict(), "kinds": kinds}


def plan(
    world_size: int,
    *,
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    ep: int = 1,
    etp: Optional[int] = None,
    order: str = DEFAULT_ORDER,
    gpus_per_node: Optional[int] = None,
    gtp_remat: int = 1,
    expert_gtp_remat: int = 1,
    rank_offset: int = 0,
) -> Layout:
    """Validate the sizes and return the :class:`Layout` of every group kind.

    Raises :class:`~mpu_bridge.errors.LayoutError` naming the numbers and the fix
    when the sizes cannot form a layout.

    Example::

        >>> plan(8, tp=2, pp=2).groups("dp")
        [[0, 2], [1, 3], [4, 6], [5, 7]]
        >>> plan(4, tp=2, rank_offset=8).groups("tp")   # a rank span: global ranks 8..11
        [[8, 9], [10, 11]]
    """
    config = ParallelConfig(
        world_size=world_size,
        tp=tp,
        pp=pp,
        cp=cp,
        ep=ep,
        etp=etp,
        order=order,
        gpus_per_node=gpus_per_node,
        gtp_remat=gtp_remat,
        expert_gtp_remat=expert_gtp_remat,
        rank_offset=rank_offset,
    )
    return Layout(config)


def expert_order(order: str, data_before_expert: Optional[bool] = None) -> str:
    """``order`` with both ``ep`` and ``dp`` in it, for planning expert groups.

    A missing ``ep`` goes just before ``dp`` (Megatron's default place: E+D); a missing
    ``dp`` just after ``ep``. ``data_before_expert`` then puts ``dp`` before ``ep``
    (DeepSpeed's D+E) when True, after it when False; None keeps the order's own.

    Example: ``expert_order("tp-cp-dp-pp") == "tp-cp-ep-dp-pp"`` and
    ``expert_order("tp-cp-ep-dp-pp", data_before_expert=True) == "tp-cp-dp-ep-pp"``.
    """
    tokens = list(_parse_order(order))
    data_before_expert = optional_bool("data_before_expert", data_before_expert, LayoutError)
    if "ep" not in tokens:
        tokens.insert(tokens.index("dp") if "dp" in tokens else len(tokens), "ep")
    if "dp" not in tokens:
        tokens.insert(tokens.index("ep") + 1, "dp")
    i, j = tokens.index("ep"), tokens.index("dp")
    if data_before_expert is not None and (i > j) != data_before_expert:
        tokens[i], tokens[j] = tokens[j], tokens[i]
    return "-".join(tokens)
