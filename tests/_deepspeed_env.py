"""Starting DeepSpeed on CPU / gloo inside a test rank process.

Used by rank functions run through :func:`_multiproc.run_ranks`, which has
already initialised ``torch.distributed`` (gloo) when they start. What DeepSpeed
needs on these CPU machines (see ENVIRONMENT.md):

* ``DS_ACCELERATOR=cpu`` before ``deepspeed`` is imported: pass
  :data:`DEEPSPEED_RANK_ENV` as ``run_ranks(..., env=DEEPSPEED_RANK_ENV)``.
* No shared-memory op build: ``init_distributed`` would compile a C++ op for
  30–70 s. :func:`start_deepspeed` replaces ``deepspeed.comm.torch.build_shm_op``
  first (``import deepspeed.comm.torch as x`` would bind the ``torch`` module
  instead, hence ``importlib``).
* ``zero_allow_untested_optimizer`` for a torch SGD optimizer under ZeRO, and an
  explicit ``gradient_clipping`` (DeepSpeed's default is 1.0, not 0).

Example (inside a rank function)::

    deepspeed = start_deepspeed()
    config = zero_config(2, micro_batch_per_rank=2, data_parallel_size=2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=sgd, config=config)
"""

from __future__ import annotations

import importlib
import logging
import os
import traceback
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

__all__ = ["DEEPSPEED_RANK_ENV", "start_deepspeed", "zero_config"]

DEEPSPEED_RANK_ENV: Mapping[str, str] = {
    "DS_ACCELERATOR": "cpu",  # read when deepspeed is first imported
    "OMP_NUM_THREADS": "1",  # four ranks share two cores
}


def start_deepspeed() -> Any:
    """Import DeepSpeed for CPU and attach its communication backend to the existing gloo group.

    Requires ``torch.distributed`` to be initialised already (``run_ranks`` does
    that); DeepSpeed then wraps that process group instead of creating one.
    Returns the ``deepspeed`` module.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("start_deepspeed() needs torch.distributed initialised first (run_ranks does it)")
    for name, value in DEEPSPEED_RANK_ENV.items():
        os.environ.setdefault(name, value)
    # DeepSpeed's CPU accelerator answers current_device() from LOCAL_RANK.
    os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
    import deepspeed

    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)  # its INFO lines would bury a failing rank's traceback
    return deepspeed


def zero_config(
    stage: int,
    *,
    micro_batch_per_rank: int,
    data_parallel_size: int,
    gradient_clipping: float = 0.0,
) -> Dict[str, Any]:
    """A DeepSpeed config for ZeRO ``stage`` (1 or 2) in fp32 with a torch optimizer.

    ``gradient_clipping=0`` switches clipping off (DeepSpeed's default would be 1.0).
    """
    return {
        "train_micro_batch_size_per_gpu": micro_batch_per_rank,
        "train_batch_size": micro_batch_per_rank * data_parallel_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": gradient_clipping,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }



def run_parts(parts: Sequence[Tuple[str, Callable[..., Dict[str, Any]]]], *args: Any) -> Dict[str, Dict[str, Any]]:
    """Run each ``(name, part)`` as ``part(*args)`` in order; a part that raises is reported
    as ``{"error": traceback}`` instead of ending the world, so the others still run."""
    reports: Dict[str, Dict[str, Any]] = {}
    for name, run in parts:
        try:
            reports[name] = run(*args)
        except Exception:
            reports[name] = {"error": traceback.format_exc()}
    return reports


def part_reports(world: List[Dict[str, Any]], part: str) -> List[Dict[str, Any]]:
    """Every rank's report of ``part``; fails the test with the traceback if the part raised."""
    import pytest

    for rank, report in enumerate(world):
        if "error" in report[part]:
            pytest.fail(f"the {part} part raised on rank {rank}:\n{report[part]['error']}", pytrace=False)
    return [report[part] for report in world]
