"""The one table of group kinds: every name a kind goes by, in one row.

A *kind* is one way of cutting the world into groups (tensor parallel, expert
data parallel, ...). Each row says which rank grid it is read from and which of
the grid's dimensions vary inside a group (``grid``, ``tokens``), and every name
the kind has elsewhere: the MPU dimension :mod:`mpu_bridge.mpu` answers
(``dim``), the :class:`~mpu_bridge.bridge.Bridge` method (``method``), the
legacy ``mpu`` getter prefixes DeepSpeed calls (``legacy``), the field of
megatron-core's ``ProcessGroupCollection`` (``pg_field``) and the ``DeviceMesh``
dimension name (``mesh_dim``). Every other name table in the package is derived
from :data:`KIND_TABLE`. No torch here.

Example::

    >>> KIND_BY_DIM["sdp"].name, KIND_BY_DIM["sdp"].method
    ('dp-cp', 'sequence_data_parallel')

megatron-core 0.19's Generalized Tensor Parallelism adds the grid token
``gtp_remat`` (:data:`GTP`): it is a model-parallel axis (``mp``, ``tp-dp`` and
``tp-dp-cp`` span it, as megatron-core's groups do), while ``dp`` / ``edp`` stay the
*replicate* groups that gradient reduction and ZeRO use; the data-*distribution*
groups that also span it are their own kinds (``gtp-dp``, ``gtp-dp-cp``,
``egtp-edp``). Rows with ``listed="gtp"`` appear in a layout's listing only when
their grid's GTP size is above 1. Rows with ``listed="ag"`` are megatron-core 0.18's
all-gather twins (``dp_cp_ag``, ``expt_dp_ag``): the same ranks as ``dp-cp`` /
``edp`` but, deliberately, a communicator of their own (``twin_of``), the one
exception to "one communicator per rank set".
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Tuple

__all__ = [
    "GTP", "Kind", "KIND_TABLE", "KINDS", "KIND_BY_DIM", "KIND_BY_METHOD", "LISTED", "kind_named", "mesh_dims",
]

#: megatron-core 0.19's Generalized Tensor Parallelism grid token (weight rematerialisation).
GTP = "gtp_remat"

#: When a row appears in a layout's listing: always, only with a GTP size above 1, or
#: never (an all-gather twin: same ranks as ``twin_of``, its own communicator).
LISTED = ("always", "gtp", "ag")


@dataclass(frozen=True)
class Kind:
    """One group kind and all its names (see the module docstring).

    ``grid`` is ``"dense"`` (sizes tp, cp, dp, pp) or ``"expert"`` (sizes etp, ep,
    edp, pp); ``tokens`` are the grid's dimensions that vary inside one group.
    Names are None where the kind has no such name.
    """

    name: str
    grid: str
    tokens: Tuple[str, ...]
    description: str
    dim: str
    method: Optional[str] = None
    legacy: Tuple[str, ...] = ()
    pg_field: Optional[str] = None
    mesh_dim: Optional[str] = None
    listed: str = "always"
    twin_of: Optional[str] = None


KIND_TABLE: Tuple[Kind, ...] = (
    Kind("tp", "dense", ("tp",), "tensor parallel", "tp", "tensor_parallel",
         ("tensor_model_parallel", "slice_parallel"), "tp", "tp"),
    Kind("cp", "dense", ("cp",), "context parallel", "cp", "sequence_parallel",
         ("sequence_parallel",), "cp", "cp"),
    Kind("dp", "dense", ("dp",), "data parallel", "dp", "data_parallel",
         ("data_parallel",), "dp", "dp"),
    Kind("pp", "dense", ("pp",), "pipeline parallel", "pp", "pipeline_parallel",
         ("pipeline_model_parallel", "pipe_parallel"), "pp", "pp"),
    Kind("dp-cp", "dense", ("dp", "cp"), "data x context parallel", "sdp", "sequence_data_parallel",
         ("sequence_data_parallel",), "dp_cp", "dp_cp"),
    Kind("tp-cp", "dense", ("tp", "cp"), "tensor x context parallel", "tp-cp", pg_field="tp_cp", mesh_dim="tp_cp"),
    Kind("tp-dp", "dense", ("tp", GTP, "dp"), "tensor x data parallel", "tp-dp", mesh_dim="tp_dp"),
    Kind("tp-dp-cp", "dense", ("tp", GTP, "dp", "cp"), "tensor x data x context parallel", "tp-dp-cp",
         pg_field="tp_dp_cp", mesh_dim="tp_dp_cp"),
    Kind("mp", "dense", ("tp", GTP, "pp"), "model parallel (tensor x pipeline)", "mp", "model_parallel",
         ("model_parallel",), "mp", "mp"),
    Kind("ep", "expert", ("ep",), "expert parallel", "ep", "expert_parallel", (), "ep", "ep"),
    Kind("etp", "expert", ("tp",), "expert tensor parallel", "etp", "expert_tensor_parallel", (),
         "expt_tp", "etp"),
    Kind("edp", "expert", ("dp",), "expert data parallel", "edp", "expert_data_parallel", (),
         "expt_dp", "edp"),
    Kind("etp-ep", "expert", ("tp", "ep"), "expert tensor x expert parallel", "etp-ep", pg_field="tp_ep",
         mesh_dim="etp_ep"),
    Kind("etp-ep-pp", "expert", ("tp", "ep", "pp"), "expert tensor x expert x pipeline parallel",
         "etp-ep-pp", pg_field="tp_ep_pp", mesh_dim="etp_ep_pp"),
    # megatron-core 0.19: Generalized Tensor Parallelism (listed only with a GTP size above 1)
    Kind("gtp", "dense", (GTP,), "generalized tensor parallel (weight remat)", "gtp",
         pg_field="gtp_remat", mesh_dim="gtp", listed="gtp"),
    Kind("gtp-dp", "dense", (GTP, "dp"), "data distribution (gtp x data parallel)", "gtp-dp",
         mesh_dim="gtp_dp", listed="gtp"),
    Kind("gtp-dp-cp", "dense", (GTP, "dp", "cp"), "data distribution with context (gtp x data x context)",
         "gtp-dp-cp", pg_field="dp_cp_gtp_remat", mesh_dim="gtp_dp_cp", listed="gtp"),
    Kind("egtp", "expert", (GTP,), "expert generalized tensor parallel", "egtp",
         pg_field="expt_gtp_remat", mesh_dim="egtp", listed="gtp"),
    Kind("egtp-edp", "expert", (GTP, "dp"), "expert data distribution (egtp x expert data)", "egtp-edp",
         pg_field="expt_dp_gtp_remat", mesh_dim="egtp_edp", listed="gtp"),
    Kind("etp-ep-egtp-pp", "expert", ("tp", "ep", GTP, "pp"), "expert model parallel with egtp",
         "etp-ep-egtp-pp", pg_field="tp_ep_pp_with_egtp_remat", mesh_dim="etp_ep_egtp_pp", listed="gtp"),
    # megatron-core 0.18: all-gather twins, a communicator of their own over the same ranks
    Kind("dp-cp-ag", "dense", ("dp", "cp"), "all-gather twin of data x context parallel", "dp-cp-ag",
         pg_field="dp_cp_ag", listed="ag", twin_of="dp-cp"),
    Kind("edp-ag", "expert", ("dp",), "all-gather twin of expert data parallel", "edp-ag",
         pg_field="expt_dp_ag", listed="ag", twin_of="edp"),
)

#: Kind name -> row, in table order.
KINDS: Mapping[str, Kind] = MappingProxyType({k.name: k for k in KIND_TABLE})
#: MPU dimension name (``"sdp"``, ``"etp-ep"`` ...) -> row.
KIND_BY_DIM: Mapping[str, Kind] = MappingProxyType({k.dim: k for k in KIND_TABLE})
#: Bridge method name (``"data_parallel"`` ...) -> row, for the kinds that have one.
KIND_BY_METHOD: Mapping[str, Kind] = MappingProxyType({k.method: k for k in KIND_TABLE if k.method})


def kind_named(name: str) -> Kind:
    """The row for a kind, MPU dimension or bridge method name; KeyError lists the names.

    Example: ``kind_named("sequence_data_parallel").name == "dp-cp"``.
    """
    for table in (KINDS, KIND_BY_DIM, KIND_BY_METHOD):
        if name in table:
            return table[name]
    known = sorted(set(KINDS) | set(KIND_BY_DIM) | set(KIND_BY_METHOD))
    raise KeyError(f"unknown group kind {name!r}; known names: {', '.join(known)}")


def mesh_dims(*, expert: bool = False, gtp: bool = False) -> Tuple[str, ...]:
    """The default dims of a ``DeviceMesh`` over one grid, slowest first, as kind names:
    every dimension of megatron-core's default order, with the GTP axis where
    megatron-core 0.19 injects it when ``gtp`` (after ``tp`` dense, after ``ep`` expert).

    Example: ``mesh_dims(gtp=True) == ("pp", "dp", "cp", "gtp", "tp")``.
    """
    if expert:
        return ("pp", "edp", "egtp", "ep", "etp") if gtp else ("pp", "edp", "ep", "etp")
    return ("pp", "dp", "cp", "gtp", "tp") if gtp else ("pp", "dp", "cp", "tp")
