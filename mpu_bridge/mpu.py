"""Reading an MPU: world sizes, ranks, groups and group ranks, whatever the MPU calls them.

An *MPU* (model-parallel unit) is anything that answers questions such as
``get_tensor_model_parallel_world_size()``: megatron-core's ``parallel_state``
module (0.4 … 0.16), an old Megatron-LM ``mpu`` (1.0, 2.x), Megatron-DeepSpeed's
``parallel_state``, DeepSpeed's ``PipelineParallelGrid``, DeepSpeed's slim Ulysses
``parallel_state_sp``, or a user's object with only some of those names.

:class:`MpuReader` answers four queries -- ``world_size``, ``rank``, ``group``,
``ranks`` (the global ranks of this rank's group) -- for each dimension in
:data:`DIMENSIONS`, plus the combined groups in :data:`COMBINED_DIMENSIONS`.

Resolution is data-driven (:data:`NAME_TABLES`): per flavour, per (dimension,
query), an ordered list of :class:`Getter` candidates (a name, optional keyword
arguments, optional condition such as ``cp>1``). For each query the reader

1. calls the candidates in order; a name that is absent, raises (megatron's
   ``assert ... is not None``), has no such keyword, or answers 0/None/-1 (megatron's
   "before initialisation" answers) is skipped and recorded;
2. derives ``world_size``/``rank``/``ranks`` from the group when there is one
   (``torch.distributed`` is imported lazily, only then);
3. follows the flavour's aliases (e.g. sequence-data = data when cp = 1, model =
   tensor when pp = 1, expert-tensor = tensor on megatron-core < 0.10);
4. otherwise raises :class:`~mpu_bridge.errors.MpuError` naming every name tried
   and what each did -- and saying the MPU looks uninitialised when some getter
   answered 0/None or asserted "not initialized".

Meaning of the ambiguous legacy names, per flavour (see ``compat/README.md``):

* ``get_model_parallel_*``: TP×PP on DeepSpeed's grid and custom objects (DeepSpeed's
  convention); the tensor-parallel group on Megatron-LM 1.0 (no pipeline there, so it
  is also TP×PP); on Megatron-DeepSpeed only ``get_model_parallel_group`` is TP×PP
  (its ``get_model_parallel_world_size``/``rank`` mean TP and refuse PP > 1, so they
  are not used); on DeepSpeed's Ulysses MPU they alias *sequence* parallelism and are
  not used; megatron-core has only ``get_model_parallel_group`` (TP×PP).
* ``get_sequence_parallel_*`` (Megatron-DeepSpeed, Ulysses) is the ``cp`` dimension;
  ``get_sequence_data_parallel_*`` is ``sdp``.

This module does not import torch at import time.

Example::

    >>> from megatron.core import parallel_state
    >>> reader = MpuReader(parallel_state)          # after initialize_model_parallel
    >>> reader.flavour, reader.world_size("tp"), reader.group_ranks("dp")  # doctest: +SKIP
    ('megatron-core', 2, [0, 2])
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from .errors import MpuError

__all__ = [
    "DIMENSIONS",
    "COMBINED_DIMENSIONS",
    "ALL_DIMENSIONS",
    "QUERIES",
    "FLAVOURS",
    "DIMENSION_KINDS",
    "DIMENSION_DESCRIPTIONS",
    "Getter",
    "Alias",
    "NAME_TABLES",
    "ALIASES",
    "FIXED_ORDERS",
    "MpuSizes",
    "MpuReader",
    "candidate_names",
    "detect_flavour",
]

logger = logging.getLogger(__name__)

#: The dimensions every reader answers (when the MPU can).
DIMENSIONS: Tuple[str, ...] = ("tp", "pp", "dp", "cp", "sdp", "mp", "ep", "edp", "etp")

#: Combined groups some MPUs also hold (named by their :mod:`mpu_bridge.layout` kind),
#: useful for reusing the MPU's own communicators.
COMBINED_DIMENSIONS: Tuple[str, ...] = ("tp-cp", "tp-dp", "tp-dp-cp", "etp-ep", "etp-ep-pp")

ALL_DIMENSIONS: Tuple[str, ...] = DIMENSIONS + COMBINED_DIMENSIONS

#: The four queries.
QUERIES: Tuple[str, ...] = ("world_size", "rank", "group", "ranks")

#: Flavours :func:`detect_flavour` can return.
FLAVOURS: Tuple[str, ...] = (
    "megatron-core",
    "megatron-lm-1",
    "megatron-lm-2",
    "megatron-deepspeed",
    "deepspeed-pipe-grid",
    "deepspeed-ulysses",
    "custom",
)

#: The :mod:`mpu_bridge.layout` kind each dimension corresponds to.
DIMENSION_KINDS: Mapping[str, str] = {
    "tp": "tp",
    "pp": "pp",
    "dp": "dp",
    "cp": "cp",
    "sdp": "dp-cp",
    "mp": "mp",
    "ep": "ep",
    "edp": "edp",
    "etp": "etp",
    "tp-cp": "tp-cp",
    "tp-dp": "tp-dp",
    "tp-dp-cp": "tp-dp-cp",
    "etp-ep": "etp-ep",
    "etp-ep-pp": "etp-ep-pp",
}

DIMENSION_DESCRIPTIONS: Mapping[str, str] = {
    "tp": "tensor parallel",
    "pp": "pipeline parallel",
    "dp": "data parallel",
    "cp": "sequence / context parallel",
    "sdp": "sequence-data parallel (data x context)",
    "mp": "model parallel (tensor x pipeline)",
    "ep": "expert parallel",
    "edp": "expert-data parallel",
    "etp": "expert-tensor parallel",
    "tp-cp": "tensor x context parallel",
    "tp-dp": "tensor x data parallel",
    "tp-dp-cp": "tensor x data x context parallel",
    "etp-ep": "expert-tensor x expert parallel",
    "etp-ep-pp": "expert-tensor x expert x pipeline parallel",
}

Condition = Tuple[str, str, int]  # (dim, "==" or ">", value), e.g. ("cp", ">", 1)


@dataclass(frozen=True)
class Getter:
    """One way to answer a query: call ``name(**kwargs)`` when ``when`` holds.

    ``when`` is ``(dim, op, value)`` with ``op`` in ``{"==", ">"}``, evaluated on the
    MPU's own sizes (a dimension the MPU has no names for counts as size 1).

    Example: ``Getter("get_data_parallel_group", (("with_context_parallel", True),),
    ("cp", ">", 1)).render()`` is
    ``"get_data_parallel_group(with_context_parallel=True) [when cp>1]"``.
    """

    name: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()
    when: Optional[Condition] = None

    def render(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.kwargs)
        text = f"{self.name}({args})"
        if self.when is not None:
            dim, op, value = self.when
            text += f" [when {dim}{op}{value}]"
        return text


@dataclass(frozen=True)
class Alias:
    """Answer ``dim`` with ``target``'s answer when ``when`` holds (and the MPU has no
    names of its own that answered).

    ``when`` may also be ``("absent", name, 0)``: only when the MPU lacks ``name``.
    """

    target: str
    when: Optional[Condition] = None

    def render(self) -> str:
        if self.when is None:
            return f"same as {self.target}"
        if self.when[0] == "absent":
            return f"same as {self.target} (no {self.when[1]})"
        dim, op, value = self.when
        return f"same as {self.target} when {dim}{op}{value}"


_Table = Dict[Tuple[str, str], Tuple[Getter, ...]]


def _trio(
    dim: str,
    prefix: str,
    *,
    ranks: Sequence[str] = (),
    group_kwargs: Tuple[Tuple[str, Any], ...] = (),
    when: Optional[Condition] = None,
) -> _Table:
    """Candidates ``<prefix>_world_size``, ``<prefix>_rank``, ``<prefix>_group`` and the
    ranks getters ``<prefix>_group_ranks`` (DeepSpeed's spelling) plus ``ranks``."""
    ranks_names = tuple(ranks) if group_kwargs else (f"{prefix}_group_ranks",) + tuple(
        name for name in ranks if name != f"{prefix}_group_ranks"
    )
    return {
        (dim, "world_size"): (Getter(f"{prefix}_world_size", group_kwargs, when),),
        (dim, "rank"): (Getter(f"{prefix}_rank", group_kwargs, when),),
        (dim, "group"): (Getter(f"{prefix}_group", group_kwargs, when),),
        (dim, "ranks"): tuple(Getter(name, (), when) for name in ranks_names),
    }


def _merge(*tables: _Table) -> _Table:
    merged: Dict[Tuple[str, str], Tuple[Getter, ...]] = {}
    for table in tables:
        for key, getters in table.items():
            merged[key] = merged.get(key, ()) + getters
    return merged


def _only(table: _Table, **keep: Sequence[str]) -> _Table:
    """Keep only the listed queries of each dim, e.g. ``mp=("group",)``."""
    return {key: value for key, value in table.items() if key[0] not in keep or key[1] in keep[key[0]]}


_WITH_CP = (("with_context_parallel", True),)
_CP_GT_1: Condition = ("cp", ">", 1)
_CP_EQ_1: Condition = ("cp", "==", 1)

_TP = _trio("tp", "get_tensor_model_parallel")
_PP = _trio("pp", "get_pipeline_model_parallel")
_DP = _trio("dp", "get_data_parallel")
_CONTEXT = _trio("cp", "get_context_parallel", ranks=("get_context_parallel_global_ranks",))
_SEQUENCE = _trio("cp", "get_sequence_parallel")
_SEQUENCE_DATA = _trio("sdp", "get_sequence_data_parallel")
_DP_WITH_CP = _trio("sdp", "get_data_parallel", group_kwargs=_WITH_CP, when=_CP_GT_1)
_MP = _trio("mp", "get_model_parallel")
_EP = _trio("ep", "get_expert_model_parallel")
_EDP = _merge(
    _trio("edp", "get_expert_data_parallel"),
    # megatron-core 0.7-0.9: the expert-data group that includes context parallelism
    _trio("edp", "get_data_modulo_expert_parallel", group_kwargs=_WITH_CP, when=_CP_GT_1),
    # megatron-core 0.4-0.9: without context parallelism (the same group when cp == 1)
    _trio("edp", "get_data_modulo_expert_parallel", when=_CP_EQ_1),
)
_ETP = _trio("etp", "get_expert_tensor_parallel")
_COMBINED = _merge(
    _trio("tp-cp", "get_tensor_and_context_parallel"),
    _trio("tp-dp", "get_tensor_and_data_parallel"),
    _trio("tp-dp-cp", "get_tensor_and_data_parallel", group_kwargs=_WITH_CP),
    _trio("etp-ep", "get_expert_tensor_and_model_parallel"),
    _trio("etp-ep", "get_tensor_and_expert_parallel"),  # megatron-core < 0.10 (etp = tp)
    {
        ("etp-ep-pp", "group"): (
            Getter("get_expert_tensor_model_pipeline_parallel_group"),
            # megatron-core 0.6-0.9: the model-parallel group of the expert layout (etp = tp)
            Getter("get_model_parallel_group", (("with_expert_parallel", True),)),
        )
    },
)
_PIPE_GRID = _merge(
    _trio("tp", "get_slice_parallel"),
    _only(_TP, tp=("world_size", "rank")),
    _trio("pp", "get_pipe_parallel"),
    _only(_PP, pp=("world_size", "rank")),
    _DP,
    _MP,
    # not DeepSpeed's grid, but objects shaped like it (legacy adapters) may add these:
    _SEQUENCE,
    _SEQUENCE_DATA,
)

_FLAVOUR_TABLES: Dict[str, _Table] = {
    "megatron-core": _merge(
        _TP, _PP, _DP, _CONTEXT, _DP_WITH_CP, _only(_MP, mp=("group",)), _EP, _EDP, _ETP, _COMBINED
    ),
    # Megatron-LM 1.0: get_model_parallel_* is the tensor-parallel group (no pipeline).
    "megatron-lm-1": _merge(_trio("tp", "get_model_parallel"), _DP, _MP),
    # Megatron-LM 2.x: tensor/pipeline/data getters; only the group for TP×PP.
    "megatron-lm-2": _merge(_TP, _PP, _DP, _only(_MP, mp=("group",))),
    # Megatron-DeepSpeed: its get_model_parallel_world_size/rank mean TP and refuse PP > 1.
    "megatron-deepspeed": _merge(
        _TP, _PP, _DP, _SEQUENCE, _SEQUENCE_DATA, _only(_MP, mp=("group",))
    ),
    "deepspeed-pipe-grid": _PIPE_GRID,
    # DeepSpeed's Ulysses MPU: get_model_parallel_* alias sequence parallelism: not used.
    "deepspeed-ulysses": _merge(_SEQUENCE, _SEQUENCE_DATA),
    "custom": _merge(
        _TP,
        _trio("tp", "get_slice_parallel"),
        _PP,
        _trio("pp", "get_pipe_parallel"),
        _DP,
        _CONTEXT,
        _SEQUENCE,
        _SEQUENCE_DATA,
        _DP_WITH_CP,
        _MP,
        _EP,
        _EDP,
        _ETP,
        _COMBINED,
    ),
}

#: Per flavour, per (dimension, query): the candidates, tried in order (read-only).
NAME_TABLES: Mapping[str, Mapping[Tuple[str, str], Tuple[Getter, ...]]] = {
    flavour: MappingProxyType(table) for flavour, table in _FLAVOUR_TABLES.items()
}

def _aliases(flavour: str) -> Dict[str, Tuple[Alias, ...]]:
    aliases: Dict[str, Tuple[Alias, ...]] = {
        "sdp": (Alias("dp", _CP_EQ_1),),
        "mp": (Alias("tp", ("pp", "==", 1)),),
        "tp-dp-cp": (Alias("tp-dp", _CP_EQ_1),),
    }
    if flavour == "megatron-core":
        # megatron-core < 0.10 has no expert-tensor parallelism: experts use the TP group.
        aliases["etp"] = (Alias("tp", ("absent", "get_expert_tensor_parallel_world_size", 0)),)
    return aliases


#: Per flavour: aliases tried after a dimension's own names (read-only).
ALIASES: Mapping[str, Mapping[str, Tuple[Alias, ...]]] = {
    flavour: MappingProxyType(_aliases(flavour)) for flavour in FLAVOURS
}

#: Rank layouts that are fixed by the flavour's own code (megatron order strings).
FIXED_ORDERS: Mapping[str, str] = {
    "megatron-lm-1": "tp-dp-pp",
    "megatron-lm-2": "tp-dp-pp",
    "megatron-deepspeed": "tp-cp-dp-pp",
    "deepspeed-ulysses": "tp-cp-dp-pp",
}

_GRID_AXIS_TOKENS = {"model": "tp", "data": "dp", "pipe": "pp"}


def _has(mpu: Any, name: str) -> bool:
    try:
        return callable(getattr(mpu, name))
    except Exception:  # a property that raises, a module __getattr__ ...
        return False


def detect_flavour(mpu: Any) -> str:
    """Which kind of MPU ``mpu`` is, from the names it has (and its module name).

    Example: ``detect_flavour(megatron.core.parallel_state)`` -> ``"megatron-core"``.
    """
    if _has(mpu, "initialize_sequence_parallel"):
        return "deepspeed-ulysses"
    if _has(mpu, "get_pipe_parallel_world_size") or _has(mpu, "get_slice_parallel_world_size"):
        return "deepspeed-pipe-grid"
    has_tensor = _has(mpu, "get_tensor_model_parallel_world_size")
    if has_tensor and (
        _has(mpu, "get_sequence_parallel_world_size") or _has(mpu, "get_sequence_data_parallel_group")
    ):
        return "megatron-deepspeed"
    module_name = getattr(mpu, "__name__", "") if inspect.ismodule(mpu) else ""
    if has_tensor and (
        module_name.startswith("megatron.core")
        or _has(mpu, "get_context_parallel_world_size")
        or _has(mpu, "get_expert_model_parallel_world_size")
    ):
        return "megatron-core"
    if has_tensor and _has(mpu, "get_pipeline_model_parallel_world_size"):
        return "megatron-lm-2"
    legacy_only = _has(mpu, "get_model_parallel_world_size") and not any(
        _has(mpu, name)
        for name in (
            "get_tensor_model_parallel_world_size",
            "get_pipeline_model_parallel_world_size",
            "get_context_parallel_world_size",
            "get_sequence_parallel_world_size",
            "get_expert_model_parallel_world_size",
        )
    )
    if legacy_only:
        return "megatron-lm-1"
    return "custom"


@dataclass(frozen=True)
class MpuSizes:
    """The MPU's parallel sizes.

    ``tp``, ``pp``, ``cp`` are 1 where the MPU has no names for them at all. ``dp`` is
    the MPU's data-parallel size (or sequence-data size / cp where it has only that,
    as DeepSpeed's Ulysses MPU), ``None`` if it answers neither. ``ep``/``etp`` are
    ``None`` when the MPU knows nothing of experts. ``order`` is the megatron order
    string when the MPU's layout is known (fixed by its flavour, read from DeepSpeed's
    topology, or an ``order`` attribute), else ``None``.

    Example: ``MpuSizes(tp=2, pp=1, dp=4, cp=1, ep=None, etp=None, order=None,
    flavour="megatron-lm-2")``.
    """

    tp: int
    pp: int
    dp: Optional[int]
    cp: int
    ep: Optional[int]
    etp: Optional[int]
    order: Optional[str]
    flavour: str

    @property
    def edp(self) -> Optional[int]:
        """Expert-data-parallel size implied by the sizes: tp·cp·dp / (etp·ep)."""
        if self.dp is None or self.ep is None:
            return None
        etp = self.tp if self.etp is None else self.etp
        dense = self.tp * self.cp * self.dp
        return dense // (etp * self.ep) if dense % (etp * self.ep) == 0 else None


def _render_trail(trail: List[str]) -> List[str]:
    lines = []
    for entry in trail:
        depth = (len(entry) - len(entry.lstrip(" "))) // 4
        lines.append("  " + "    " * depth + "- " + entry.strip())
    return lines


class _Failure(Exception):
    """Internal: a query could not be answered (carries the trail)."""

    def __init__(self, trail: List[str], uninitialised: bool) -> None:
        super().__init__("; ".join(trail))
        self.trail = trail
        self.uninitialised = uninitialised


_UNINIT_WORDS = ("not initialized", "not initialised", "uninitialized", "is none")


def _dist() -> Any:
    import torch.distributed as dist  # lazy: only when a group must be inspected

    return dist


class MpuReader:
    """Answers world size, rank, group and group ranks for each dimension of an MPU.

    ``mpu`` is a module or an object. ``flavour`` overrides detection (one of
    :data:`FLAVOURS`). Nothing is cached: every answer comes from the MPU when asked,
    except inside :meth:`snapshot`.

    Example::

        >>> reader = MpuReader(parallel_state)                      # doctest: +SKIP
        >>> reader.sizes()                                           # doctest: +SKIP
        MpuSizes(tp=2, pp=2, dp=2, cp=1, ep=1, etp=2, order=None, flavour='megatron-core')
    """

    def __init__(self, mpu: object, *, flavour: Optional[str] = None) -> None:
        if mpu is None:
            raise MpuError("no MPU given: pass megatron.core.parallel_state, an mpu module or object")
        if flavour is not None and flavour not in FLAVOURS:
            raise MpuError(f"unknown MPU flavour {flavour!r}; valid flavours: {', '.join(FLAVOURS)}")
        self.mpu = mpu
        self.flavour: str = flavour or detect_flavour(mpu)
        self.is_ulysses: bool = _has(mpu, "initialize_sequence_parallel")
        self._table = NAME_TABLES[self.flavour]
        self._aliases = ALIASES[self.flavour]
        self._memo: Optional[Dict[Tuple[str, Tuple[Tuple[str, Any], ...]], Tuple[bool, Any, str]]] = None
        logger.debug("reading MPU %r as flavour %s", mpu, self.flavour)

    @contextlib.contextmanager
    def snapshot(self) -> Iterator["MpuReader"]:
        """Within the block, each MPU getter is called once and its answer reused.

        For reading many answers from an MPU that does not change meanwhile (the
        bridge's attach). Nests; answers are forgotten when the outermost block ends.
        Example: ``with reader.snapshot(): sizes = reader.sizes()``.
        """
        outer = self._memo
        if outer is None:
            self._memo = {}
        try:
            yield self
        finally:
            if outer is None:
                self._memo = None

    def __repr__(self) -> str:
        return f"MpuReader(flavour={self.flavour!r}, mpu={self.mpu!r})"

    # -- public queries ----------------------------------------------------------

    def has(self, dim: str, query: str = "world_size") -> bool:
        """Whether the MPU answers ``query`` for ``dim`` now (resolvable and initialised)."""
        self._check(dim, query)
        try:
            self._resolve(dim, query, ())
        except _Failure:
            return False
        return True

    def world_size(self, dim: str) -> int:
        """Size of this rank's ``dim`` group. Raises :class:`MpuError` if unanswerable."""
        return self._answer(dim, "world_size")

    def rank(self, dim: str) -> int:
        """This rank's index in its ``dim`` group. Raises :class:`MpuError` if unanswerable."""
        return self._answer(dim, "rank")

    def group(self, dim: str) -> Any:
        """This rank's ``dim`` process group. Raises :class:`MpuError` if unanswerable."""
        return self._answer(dim, "group")

    def group_ranks(self, dim: str) -> List[int]:
        """Global ranks of this rank's ``dim`` group, in the MPU's order.

        From the MPU's ranks getter when it has one, else
        ``torch.distributed.get_process_group_ranks(group)``.
        """
        return list(self._answer(dim, "ranks"))

    def source(self, dim: str, query: str) -> str:
        """Which getter (or derivation) answers ``query`` for ``dim``, e.g.
        ``"get_data_parallel_group(with_context_parallel=True)"``."""
        self._check(dim, query)
        try:
            return self._resolve(dim, query, ())[1]
        except _Failure as failure:
            raise self._error(dim, query, failure) from None

    def tried(self, dim: str, query: str = "world_size") -> List[str]:
        """Every name (and derivation) the reader tries for ``query`` on ``dim``, in order."""
        self._check(dim, query)
        return self._plan(dim, query, ())

    def sizes(self) -> MpuSizes:
        """The MPU's sizes (see :class:`MpuSizes`); raises :class:`MpuError` when the MPU
        has names for a dimension but they do not answer (e.g. uninitialised)."""
        tp = self._size_or_one("tp")
        pp = self._size_or_one("pp")
        cp = self._size_or_one("cp")
        dp = self._optional_size("dp")
        if dp is None:
            sdp = self._optional_size("sdp")
            if sdp is not None:
                if sdp % cp:
                    raise MpuError(
                        f"the MPU's sequence-data-parallel size {sdp} is not divisible by its "
                        f"sequence-parallel size {cp} ({self.flavour})"
                    )
                dp = sdp // cp
        ep = self._optional_size("ep")
        etp = self._optional_size("etp") if ep is not None else None
        return MpuSizes(tp=tp, pp=pp, dp=dp, cp=cp, ep=ep, etp=etp, order=self._order(), flavour=self.flavour)

    def check_against_world(self, world_size: int, rank: int) -> None:
        """Raise :class:`MpuError` with the numbers when the MPU contradicts the world.

        Checks tp·pp·dp·cp = world; every group the MPU returns has as many ranks as it
        reports and contains ``rank`` at the reported index; sequence-data = dp·cp;
        model = tp·pp; etp·ep·edp·pp = world when experts are known.

        Example: an MPU reporting tp=2, pp=2, dp=4 in a world of 8 raises
        ``MpuError("... tp·pp·dp·cp = 2·2·4·1 = 16, but the world has 8 ranks ...")``.
        """
        sizes = self.sizes()
        tp, pp, cp, dp = sizes.tp, sizes.pp, sizes.cp, sizes.dp
        dense = tp * pp * cp
        if dp is None:
            if world_size % dense:
                raise MpuError(
                    f"the MPU's sizes do not fit the world: world size {world_size} is not "
                    f"divisible by tp·pp·cp = {dense} (tp={tp}, pp={pp}, cp={cp}; "
                    f"flavour {self.flavour}); the MPU was set up for another world"
                )
            dp = world_size // dense
        elif dense * dp != world_size:
            raise MpuError(
                f"the MPU's sizes do not multiply to the world: tp·pp·dp·cp = "
                f"{tp}·{pp}·{dp}·{cp} = {dense * dp}, but the world has {world_size} ranks "
                f"(flavour {self.flavour}); initialise the MPU with sizes whose product is "
                f"{world_size}"
            )
        expected = {"sdp": dp * cp, "mp": tp * pp}
        if sizes.ep is not None:
            etp = tp if sizes.etp is None else sizes.etp
            expert = etp * sizes.ep * pp
            if world_size % expert:
                raise MpuError(
                    f"the MPU's expert sizes do not fit the world: etp·ep·pp = "
                    f"{etp}·{sizes.ep}·{pp} = {expert} does not divide {world_size}"
                )
            expected["edp"] = world_size // expert
        for dim in ALL_DIMENSIONS:
            self._check_dim(dim, world_size, rank, expected.get(dim))

    # -- internals -----------------------------------------------------------------

    def _check(self, dim: str, query: str) -> None:
        if dim not in ALL_DIMENSIONS:
            raise MpuError(
                f"unknown dimension {dim!r}; valid dimensions: {', '.join(ALL_DIMENSIONS)}"
            )
        if query not in QUERIES:
            raise MpuError(f"unknown query {query!r}; valid queries: {', '.join(QUERIES)}")

    def _answer(self, dim: str, query: str) -> Any:
        self._check(dim, query)
        try:
            return self._resolve(dim, query, ())[0]
        except _Failure as failure:
            raise self._error(dim, query, failure) from None

    def _error(self, dim: str, query: str, failure: _Failure) -> MpuError:
        what = f"{DIMENSION_DESCRIPTIONS[dim]} ({dim}) {query.replace('_', ' ')}"
        lines = "\n".join(_render_trail(failure.trail)) or "  (no candidates)"
        message = f"the MPU ({self.flavour}) cannot answer the {what}; tried:\n{lines}"
        if failure.uninitialised:
            message += (
                "\nThe MPU looks uninitialised (getters answered 0/None or asserted "
                "'not initialized'): call its initialize_model_parallel(...) before "
                "reading it."
            )
        else:
            message += (
                f"\nGive the MPU one of these names, or build the {dim} group another way."
            )
        return MpuError(message)

    def _plan(self, dim: str, query: str, seen: Tuple[str, ...]) -> List[str]:
        names = [getter.render() for getter in self._table.get((dim, query), ())]
        if query != "group":
            names.append(f"derived from the {dim} group")
            names.extend(f"    {name}" for name in self._plan(dim, "group", seen + (dim,)))
        for alias in self._aliases.get(dim, ()):
            if alias.target in seen:
                continue
            names.append(alias.render())
            names.extend(f"    {name}" for name in self._plan(alias.target, query, seen + (dim,)))
        return names

    def _condition(self, when: Optional[Condition]) -> Tuple[bool, str, bool]:
        """(holds, why not, the MPU looked uninitialised while checking)."""
        if when is None:
            return True, "", False
        subject, op, value = when
        if subject == "absent":
            return (not _has(self.mpu, op)), f"{op} is present", False
        try:
            size = self._size_or_one(subject)
        except MpuError as exc:
            return False, f"{subject} size unknown", "uninitialised" in str(exc)
        ok = size == value if op == "==" else size > value
        return ok, f"{subject} = {size}", False

    def _call(self, getter: Getter) -> Tuple[bool, Any, str]:
        """Returns (called, value, note)."""
        memo = self._memo
        if memo is None:
            return self._call_now(getter)
        try:
            key = (getter.name, getter.kwargs)
            hash(key)
        except TypeError:
            return self._call_now(getter)
        if key not in memo:
            memo[key] = self._call_now(getter)
        return memo[key]

    def _call_now(self, getter: Getter) -> Tuple[bool, Any, str]:
        try:
            func = getattr(self.mpu, getter.name)
        except AttributeError:
            return False, None, "absent"
        except Exception as exc:  # e.g. a property that raises
            return False, None, f"raised {type(exc).__name__}: {exc}"
        if not callable(func):
            return False, None, f"not callable ({type(func).__name__})"
        kwargs = dict(getter.kwargs)
        if kwargs:
            try:
                params = inspect.signature(func).parameters
            except (TypeError, ValueError):
                params = None
            if params is not None:
                takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
                missing = [key for key in kwargs if key not in params]
                if missing and not takes_any:
                    return False, None, f"has no parameter {missing[0]!r}"
        try:
            return True, func(**kwargs), ""
        except Exception as exc:
            return True, None, f"raised {type(exc).__name__}: {exc}"

    @staticmethod
    def _validate(query: str, value: Any) -> Tuple[bool, Any, str]:
        if query in ("world_size", "rank"):
            if isinstance(value, bool) or not isinstance(value, int):
                if value is None:
                    return False, None, "returned None"
                try:
                    import numbers

                    if isinstance(value, numbers.Integral):
                        value = int(value)
                    else:
                        return False, None, f"returned {value!r}, not an int"
                except Exception:
                    return False, None, f"returned {value!r}, not an int"
            if query == "world_size" and value <= 0:
                return False, None, f"returned {value}"
            if query == "rank" and value < 0:
                return False, None, f"returned {value} (not a member)"
            return True, int(value), ""
        if query == "group":
            if value is None:
                return False, None, "returned None"
            if isinstance(value, (int, str, bool)):
                return False, None, f"returned {value!r}, not a process group"
            return True, value, ""
        # ranks
        if value is None:
            return False, None, "returned None"
        try:
            ranks = [int(r) for r in value]
        except (TypeError, ValueError):
            return False, None, f"returned {value!r}, not a list of ranks"
        if not ranks:
            return False, None, "returned an empty list"
        return True, ranks, ""

    def _resolve(self, dim: str, query: str, seen: Tuple[str, ...]) -> Tuple[Any, str]:
        trail: List[str] = []
        uninitialised = False
        for getter in self._table.get((dim, query), ()):
            ok, why, uninit = self._condition(getter.when)
            uninitialised = uninitialised or uninit
            if not ok:
                trail.append(f"{getter.render()}: skipped ({why})")
                continue
            called, value, note = self._call(getter)
            if called and not note:
                valid, value, note = self._validate(query, value)
                if valid:
                    return value, getter.render()
                if note.startswith("returned 0") or note == "returned None":
                    uninitialised = True
            elif called and any(word in note.lower() for word in _UNINIT_WORDS):
                uninitialised = True
            trail.append(f"{getter.render()}: {note}")
        if query != "group":
            try:
                group, group_source = self._resolve(dim, "group", seen + (dim,))
            except _Failure as failure:
                trail.append(f"derived from the {dim} group: no group")
                trail.extend(f"    {entry}" for entry in failure.trail)
                uninitialised = uninitialised or failure.uninitialised
            else:
                try:
                    value = self._from_group(query, group)
                except Exception as exc:
                    trail.append(
                        f"derived from the {dim} group ({group_source}): "
                        f"{type(exc).__name__}: {exc}"
                    )
                else:
                    return value, f"{query} of {group_source}"
        for alias in self._aliases.get(dim, ()):
            if alias.target in seen:
                continue
            ok, why, uninit = self._condition(alias.when)
            uninitialised = uninitialised or uninit
            if not ok:
                trail.append(f"{alias.render()}: skipped ({why})")
                continue
            try:
                value, source = self._resolve(alias.target, query, seen + (dim,))
            except _Failure as failure:
                trail.append(f"{alias.render()}: not answered either")
                trail.extend(f"    {entry}" for entry in failure.trail)
                uninitialised = uninitialised or failure.uninitialised
            else:
                return value, f"{source} ({dim} {alias.render()})"
        raise _Failure(trail, uninitialised)

    @staticmethod
    def _from_group(query: str, group: Any) -> Any:
        dist = _dist()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        if query == "world_size":
            size = dist.get_world_size(group=group)
            if size <= 0:
                raise RuntimeError(f"group size {size}")
            return int(size)
        if query == "rank":
            rank = dist.get_rank(group=group)
            if rank < 0:
                raise RuntimeError("this rank is not a member of the group")
            return int(rank)
        return [int(r) for r in dist.get_process_group_ranks(group)]

    def names_present(self, dim: str) -> bool:
        """Whether the MPU has any of the names in ``dim``'s own size or group candidates
        (initialised or not, whatever their conditions; aliases do not count).

        Example: True for ``"cp"`` on megatron-core (``get_context_parallel_*``) and on
        Megatron-DeepSpeed (``get_sequence_parallel_*``); False for ``"pp"`` on
        Megatron-LM 1.0.
        """
        self._check(dim, "world_size")
        return self._names_present(dim)

    def _names_present(self, dim: str) -> bool:
        for query in ("world_size", "group"):
            for getter in self._table.get((dim, query), ()):
                if _has(self.mpu, getter.name):
                    return True
        return False

    def _size_or_one(self, dim: str) -> int:
        """The MPU's size for ``dim``; 1 when it has no names for ``dim`` at all."""
        if not self._names_present(dim):
            return 1
        return self.world_size(dim)

    def _optional_size(self, dim: str) -> Optional[int]:
        """The MPU's size for ``dim``; None when it has no names (nor alias) for it."""
        if self._names_present(dim):
            return self.world_size(dim)
        for alias in self._aliases.get(dim, ()):
            ok, _, _ = self._condition(alias.when)
            if ok and self._names_present(alias.target):
                return self.world_size(dim)
        return None

    def _order(self) -> Optional[str]:
        order = getattr(self.mpu, "order", None)
        if isinstance(order, str) and order:
            return order
        if self.flavour in FIXED_ORDERS:
            return FIXED_ORDERS[self.flavour]
        if self.flavour == "deepspeed-pipe-grid" and _has(self.mpu, "topology"):
            try:
                axes = list(self.mpu.topology().get_axis_names())  # type: ignore[attr-defined]
            except Exception:
                return None
            if all(axis in _GRID_AXIS_TOKENS for axis in axes):
                # DeepSpeed's ProcessTopology varies its last axis fastest.
                tokens = [_GRID_AXIS_TOKENS[axis] for axis in reversed(axes)]
                return "-".join(tokens)
        return None

    def _check_dim(self, dim: str, world_size: int, rank: int, expected: Optional[int]) -> None:
        if not self.has(dim):
            return
        size = self.world_size(dim)
        size_source = self.source(dim, "world_size")
        if size > world_size:
            raise MpuError(
                f"the MPU's {dim} size {size} (from {size_source}) exceeds the world size {world_size}"
            )
        if expected is not None and size != expected:
            raise MpuError(
                f"the MPU's {DIMENSION_DESCRIPTIONS[dim]} size is {size} (from {size_source}), "
                f"but its other sizes imply {expected} (world {world_size}, flavour "
                f"{self.flavour}); the MPU's groups are inconsistent"
            )
        if self.has(dim, "rank"):
            dim_rank = self.rank(dim)
            if dim_rank >= size:
                raise MpuError(
                    f"the MPU reports rank {dim_rank} in its {dim} group of size {size} "
                    f"(from {self.source(dim, 'rank')})"
                )
        if self.has(dim, "group"):
            group_size = self._torch_group_size(self.group(dim))
            if group_size is not None and group_size != size:
                raise MpuError(
                    f"the MPU's {dim} group ({self.source(dim, 'group')}) has {group_size} "
                    f"ranks, but the MPU reports a {dim} size of {size} (from {size_source})"
                )
        if not self.has(dim, "ranks"):
            return
        ranks = self.group_ranks(dim)
        ranks_source = self.source(dim, "ranks")
        if len(ranks) != size:
            raise MpuError(
                f"the MPU's {dim} group has {len(ranks)} ranks {ranks} (from {ranks_source}), "
                f"but the MPU reports a {dim} size of {size} (from {size_source})"
            )
        if any(r < 0 or r >= world_size for r in ranks) or len(set(ranks)) != len(ranks):
            raise MpuError(
                f"the MPU's {dim} group {ranks} (from {ranks_source}) is not a set of distinct "
                f"ranks of the world of {world_size}"
            )
        if rank not in ranks:
            raise MpuError(
                f"rank {rank} is not in its own {dim} group {ranks} (from {ranks_source})"
            )
        if self.has(dim, "rank") and ranks.index(rank) != self.rank(dim):
            raise MpuError(
                f"the MPU reports rank {self.rank(dim)} in the {dim} group (from "
                f"{self.source(dim, 'rank')}), but rank {rank} is at position "
                f"{ranks.index(rank)} of {ranks}"
            )

    @staticmethod
    def _torch_group_size(group: Any) -> Optional[int]:
        """The group's size according to torch.distributed, None if it cannot tell."""
        try:
            dist = _dist()
            if not dist.is_initialized():
                return None
            return int(dist.get_world_size(group=group))
        except Exception:
            return None


def candidate_names(flavour: str) -> List[Tuple[str, str, Getter]]:
    """``(dim, query, getter)`` for every candidate of ``flavour``, in table order.

    Example: ``("sdp", "group", Getter("get_sequence_data_parallel_group"))`` is among
    ``candidate_names("megatron-deepspeed")``.
    """
    if flavour not in NAME_TABLES:
        raise MpuError(f"unknown MPU flavour {flavour!r}; valid flavours: {', '.join(FLAVOURS)}")
    return [(dim, query, g) for (dim, query), gs in NAME_TABLES[flavour].items() for g in gs]
