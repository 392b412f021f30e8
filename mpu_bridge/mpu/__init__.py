"""Reading an MPU: world sizes, ranks, groups and group ranks, whatever the MPU calls them.

An *MPU* (model-parallel unit) is anything that answers questions such as
``get_tensor_model_parallel_world_size()``: megatron-core's ``parallel_state``
module (0.4 … 0.16), an old Megatron-LM ``mpu`` (1.0, 2.x), Megatron-DeepSpeed's
``parallel_state``, DeepSpeed's ``PipelineParallelGrid``, DeepSpeed's slim Ulysses
``parallel_state_sp``, or a user's object with only some of those names.

:class:`MpuReader` answers four queries -- ``world_size``, ``rank``, ``group``,
``ranks`` (the global ranks of this rank's group) -- for each dimension in
:data:`DIMENSIONS`, plus the combined groups in :data:`COMBINED_DIMENSIONS`.

The package, one idea per module:

* :mod:`~mpu_bridge.mpu.names` -- the data-driven name tables (which getter answers
  which dimension and query, per flavour), flavour detection, :func:`check_is_mpu`;
* :mod:`~mpu_bridge.mpu.reader` -- :class:`MpuReader`, resolving a query through the
  tables (candidates, derivation from the group, aliases) into an answer or an
  :class:`~mpu_bridge.errors.MpuError` naming every name tried;
* :mod:`~mpu_bridge.mpu.checks` -- the consistency checks of the answers against the world;
* :mod:`~mpu_bridge.mpu.order` -- which Megatron rank order an MPU used, from its groups.

Nothing here imports torch at import time. To teach the reader a new MPU flavour,
add its table to ``_FLAVOUR_TABLES`` (and its detection to :func:`detect_flavour`)
in :mod:`~mpu_bridge.mpu.names`.

Example::

    >>> from megatron.core import parallel_state
    >>> reader = MpuReader(parallel_state)          # after initialize_model_parallel
    >>> reader.flavour, reader.world_size("tp"), reader.group_ranks("dp")  # doctest: +SKIP
    ('megatron-core', 2, [0, 2])
"""

from __future__ import annotations

from .names import (
    ALIASES,
    ALL_DIMENSIONS,
    COMBINED_DIMENSIONS,
    DIMENSION_DESCRIPTIONS,
    DIMENSION_KINDS,
    DIMENSIONS,
    FIXED_ORDERS,
    FLAVOURS,
    NAME_TABLES,
    QUERIES,
    Alias,
    Getter,
    candidate_names,
    check_is_mpu,
    detect_flavour,
)
from .reader import MpuReader, MpuSizes

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
    "check_is_mpu",
    "detect_flavour",
]
