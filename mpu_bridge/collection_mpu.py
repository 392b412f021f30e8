"""megatron-core's ``ProcessGroupCollection`` read as an MPU (``attach(collection)``).

Megatron is moving from the global ``parallel_state`` to explicit collections
(``pg_collection=``, Megatron-Bridge's decentralized process groups): a trainer written
that way has no ``parallel_state`` to hand over. :class:`CollectionMpu` offers
megatron-core's getter names for the groups a collection *holds*, so the bridge's
reader, order inference, consistency checks and borrowing work unchanged: every group
the collection holds is borrowed (nothing created), sizes and the rank order are
inferred from its groups and checked against every one of them, and what it lacks
(other expert sizes, hpZ, all-to-all, sequence-data ...) is derived.

Fields are read with ``vars()``, never ``getattr``: megatron-core 0.19's collection
answers None for any declared field that was never set. A field that is unset or None
has no getter here, so the reader treats that group as absent (size 1 for tp, pp, cp).

The reader reports it as the MPU flavour ``"pg-collection"`` (detected by class, see
:func:`mpu_bridge.mpu.names.detect_flavour`). Only groups are offered: world sizes,
ranks and rank lists are derived from them.

Example (every rank)::

    pgc = ProcessGroupCollection(tp=..., pp=..., dp=..., ...)   # or from another bridge
    bridge = mpu_bridge.attach(pgc)          # reads CollectionMpu(pgc)
    bridge.reader.flavour                    # "pg-collection"
    bridge.tensor_parallel().group is pgc.tp # True
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Tuple

from .errors import MpuError

__all__ = ["CollectionMpu", "is_collection", "FIELD_GETTERS"]

#: Field -> (megatron-core getter name, the keyword arguments that select this field).
#: Several fields share a getter (the data-parallel ones); a call picks the field whose
#: arguments it asked for, as megatron-core's ``parallel_state`` does.
FIELD_GETTERS: Mapping[str, Tuple[str, Tuple[Tuple[str, Any], ...]]] = {
    "tp": ("get_tensor_model_parallel_group", ()),
    "pp": ("get_pipeline_model_parallel_group", ()),
    "mp": ("get_model_parallel_group", ()),
    "cp": ("get_context_parallel_group", ()),
    "tp_cp": ("get_tensor_and_context_parallel_group", ()),
    "hcp": ("get_hierarchical_context_parallel_groups", ()),
    "ep": ("get_expert_model_parallel_group", ()),
    "expt_tp": ("get_expert_tensor_parallel_group", ()),
    "tp_ep": ("get_expert_tensor_and_model_parallel_group", ()),
    "tp_ep_pp": ("get_expert_tensor_model_pipeline_parallel_group", (("with_egtp_remat", False),)),
    "tp_ep_pp_with_egtp_remat": ("get_expert_tensor_model_pipeline_parallel_group", (("with_egtp_remat", True),)),
    "embd": ("get_embedding_group", ()),
    "pos_embd": ("get_position_embedding_group", ()),
    "tp_dp_cp": ("get_tensor_and_data_parallel_group", (("with_context_parallel", True),)),
    "dp": ("get_data_parallel_group", (("with_context_parallel", False), ("with_gtp_remat", False),
                                       ("partial_data_parallel", False))),
    "dp_cp": ("get_data_parallel_group", (("with_context_parallel", True), ("with_gtp_remat", False),
                                          ("partial_data_parallel", False))),
    "dp_cp_gtp_remat": ("get_data_parallel_group", (("with_context_parallel", True), ("with_gtp_remat", True),
                                                    ("partial_data_parallel", False))),
    "intra_dp_cp": ("get_data_parallel_group", (("with_context_parallel", True), ("with_gtp_remat", False),
                                                ("partial_data_parallel", True))),
    "gtp_remat": ("get_gtp_weight_remat_group", ()),
    "expt_gtp_remat": ("get_expert_gtp_weight_remat_group", ()),
    "expt_dp": ("get_expert_data_parallel_group", (("with_gtp_remat", False),
                                                   ("partial_expert_data_parallel", False))),
    "expt_dp_gtp_remat": ("get_expert_data_parallel_group", (("with_gtp_remat", True),
                                                             ("partial_expert_data_parallel", False))),
    "intra_expt_dp": ("get_expert_data_parallel_group", (("with_gtp_remat", False),
                                                         ("partial_expert_data_parallel", True))),
    "inter_dist_opt": ("get_inter_distributed_optimizer_instance_group", ()),
    "intra_dist_opt": ("get_intra_distributed_optimizer_instance_group", ()),
}

#: The defaults of the shared getters' selecting arguments: megatron-core's, except that a
#: collection's data-parallel groups are the replicate ones (what its ``dp`` field holds).
_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "get_data_parallel_group": {"with_context_parallel": False, "with_gtp_remat": False,
                                "partial_data_parallel": False},
    "get_expert_data_parallel_group": {"with_gtp_remat": False, "partial_expert_data_parallel": False},
    "get_expert_tensor_model_pipeline_parallel_group": {"with_egtp_remat": False},
    "get_tensor_and_data_parallel_group": {"with_context_parallel": False},
}
#: Fields megatron-core leaves None on some ranks (or all): set to None, they keep their getter.
_MAY_BE_NONE = frozenset({"embd", "pos_embd", "hcp", "inter_dist_opt"})
#: Keyword arguments the getters accept and ignore (megatron-core's own getters take them).
_IGNORED = frozenset({"check_initialized"})
#: The all-gather twins: held, never offered through a getter (parallel_state has none).
_ALL_GATHER = ("dp_cp_ag", "expt_dp_ag")


def is_collection(obj: Any) -> bool:
    """Whether ``obj`` is a megatron-core ``ProcessGroupCollection`` (by class, without
    importing megatron-core: only a process that made one has it)."""
    cls = type(obj)
    return (
        cls.__name__ == "ProcessGroupCollection"
        and cls.__module__.startswith("megatron.core")
        and dataclasses.is_dataclass(obj)
    )


class CollectionMpu:
    """A ``ProcessGroupCollection`` with megatron-core's getter names for the groups it
    holds (see the module docstring). ``all_gather_groups`` holds its all-gather twins.

    Example: ``CollectionMpu(pgc).get_tensor_model_parallel_group() is pgc.tp``.
    """

    def __init__(self, collection: Any) -> None:
        if not is_collection(collection):
            raise MpuError(f"{type(collection).__name__} is not megatron-core's ProcessGroupCollection")
        # A field set to None is absent, except those megatron-core leaves None on some
        # ranks only (embd off the embedding stages, pos_embd off the first): their getter
        # exists on every rank, so every rank asks the same questions.
        values = vars(collection)
        held = {k: v for k, v in values.items() if v is not None or k in _MAY_BE_NONE}
        self.collection = collection
        self.fields: Tuple[str, ...] = tuple(f for f in FIELD_GETTERS if f in held)
        self.all_gather_groups: Dict[str, Any] = {f: held[f] for f in _ALL_GATHER if held.get(f) is not None}
        by_name: Dict[str, Dict[Tuple[Tuple[str, Any], ...], str]] = {}
        for field in self.fields:
            name, selector = FIELD_GETTERS[field]
            by_name.setdefault(name, {})[selector] = field
        for name, choices in by_name.items():
            setattr(self, name, self._getter(name, choices, held))
        if not any(held[f] is not None for f in self.fields):
            raise MpuError("the ProcessGroupCollection holds no group (every field is unset or None)")

    @staticmethod
    def _getter(
        name: str, choices: Dict[Tuple[Tuple[str, Any], ...], str], held: Mapping[str, Any]
    ) -> Callable[..., Any]:
        """A getter ``name(**kwargs)`` answering the field whose selector the call matches
        (arguments it does not name take :data:`_DEFAULTS`); None when the collection does
        not hold that variant."""
        defaults: Dict[str, Any] = dict(_DEFAULTS.get(name, {}))

        def getter(**kwargs: Any) -> Any:
            unknown = [k for k in kwargs if k not in defaults and k not in _IGNORED]
            if unknown:
                raise TypeError(f"{name}() got an unexpected keyword argument {unknown[0]!r}")
            asked = {**defaults, **{k: v for k, v in kwargs.items() if k in defaults}}
            for selector, field in choices.items():
                if all(asked[k] == v for k, v in selector):
                    return held[field]
            return None  # the collection does not hold that variant

        getter.__name__ = name
        return getter

    def __repr__(self) -> str:
        return f"<ProcessGroupCollection read as an MPU: {', '.join(self.fields)}>"
