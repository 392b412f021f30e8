"""megatron-core's ``parallel_state`` for the rank processes of the tests: import it quietly,
initialise it with sizes given by name (the defaults are megatron-core's own).

Example (inside a rank)::

    ps = megatron_parallel_state()
    initialize_megatron(ps, tp=2, pp=2)
"""

from __future__ import annotations

import warnings
from typing import Any

from mpu_bridge.layout import DEFAULT_ORDER


def megatron_parallel_state() -> Any:
    """``megatron.core.parallel_state``, imported without its Transformer Engine / Apex warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state

    return parallel_state


def supports_gtp(ps: Any) -> bool:
    """Whether this megatron-core has Generalized Tensor Parallelism (0.19's ``gtp_remat_size``)."""
    import inspect

    return "gtp_remat_size" in inspect.signature(ps.initialize_model_parallel).parameters


def initialize_megatron(ps: Any, **sizes: Any) -> None:
    """``ps.initialize_model_parallel`` with ``tp``, ``pp``, ``cp``, ``ep``, ``etp``,
    ``order`` and (megatron-core 0.19) ``gtp_remat`` / ``expert_gtp_remat`` from ``sizes``
    (other keys ignored), without gloo twins."""
    gtp = {f"{k}_size": sizes[k] for k in ("gtp_remat", "expert_gtp_remat") if k in sizes}
    ps.initialize_model_parallel(
        tensor_model_parallel_size=sizes.get("tp", 1),
        pipeline_model_parallel_size=sizes.get("pp", 1),
        context_parallel_size=sizes.get("cp", 1),
        expert_model_parallel_size=sizes.get("ep", 1),
        expert_tensor_parallel_size=sizes.get("etp"),
        order=sizes.get("order", DEFAULT_ORDER),
        create_gloo_process_groups=False,
        **gtp,
    )
