"""DeepSpeed ZeRO over megatron-core's parallel_state, through the bridge's legacy MPU.

Needs DeepSpeed and megatron-core (``pip install 'mpu-bridge[megatron,deepspeed]'``). Run it
on 4 processes (CPU and gloo are enough; NCCL is used when every process has a GPU)::

    torchrun --standalone --nproc-per-node 4 examples/deepspeed_megatron.py

``deepspeed.initialize(mpu=parallel_state)`` fails: megatron-core has no
``get_model_parallel_world_size``. ``bridge.as_legacy_mpu()`` answers the names
DeepSpeed calls from megatron-core's groups: with tensor parallel 2 on 4 ranks,
DeepSpeed's data-parallel group is megatron-core's (2 ranks) and its model-parallel
group is the 2 tensor-parallel ranks. A column-parallel linear regression (each
tensor-parallel rank holds half of the weight's rows) trains three ZeRO-2 steps;
rank 0 prints each rank's groups as DeepSpeed sees them, and the loss of the whole
model over the whole batch at each step, before its update. On CPU, DeepSpeed builds its shared-memory
communication op on the first run (it caches it under ~/.cache/torch_extensions).
"""

from __future__ import annotations

import logging

import deepspeed
import torch
import torch.distributed as dist
from megatron.core import parallel_state

import mpu_bridge

TP = 2
IN_FEATURES, OUT_FEATURES = 3, 4  # the weight's 4 rows are split over the 2 tensor-parallel ranks
MICRO_BATCH = 2
STEPS = 3


class ColumnParallelRegression(torch.nn.Module):
    """This tensor-parallel rank's rows of a linear layer, fitted by squared error."""

    def __init__(self, tp_rank: int) -> None:
        super().__init__()
        weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=torch.Generator().manual_seed(0))
        rows = OUT_FEATURES // TP
        self.rows = slice(tp_rank * rows, (tp_rank + 1) * rows)
        self.weight = torch.nn.Parameter(weight[self.rows].clone())
        self.weight.tensor_model_parallel = True  # DeepSpeed counts its norm on every TP rank

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((inputs @ self.weight.T - targets[:, self.rows]) ** 2).sum() / inputs.shape[0]


def batch(dp_rank: int) -> tuple:
    """The micro-batch of one data-parallel rank (the same on its tensor-parallel ranks)."""
    gen = torch.Generator().manual_seed(1000 + dp_rank)
    return torch.randn(MICRO_BATCH, IN_FEATURES, generator=gen), torch.randn(MICRO_BATCH, OUT_FEATURES, generator=gen)


def main() -> None:
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")  # torchrun's variables
    deepspeed.utils.logger.setLevel(logging.WARNING)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=TP)
    bridge = mpu_bridge.attach(parallel_state)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank()

    model = ColumnParallelRegression(tp_rank)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,  # a plain torch optimizer under ZeRO
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        config=config,
        mpu=bridge.as_legacy_mpu(),  # not parallel_state itself
    )
    inputs, targets = (t.to(engine.device) for t in batch(dp_rank))
    losses = []
    for _ in range(STEPS):
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
        # The whole model's loss on the whole batch: the sum over all ranks' rows and
        # micro-batches, divided by the number of micro-batches (data-parallel size).
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / engine.dp_world_size)

    rank = dist.get_rank()
    line = (
        f"rank {rank}: DeepSpeed data parallel {dist.get_process_group_ranks(engine.data_parallel_group)}, "
        f"ZeRO's model parallel {dist.get_process_group_ranks(engine.optimizer.model_parallel_group)}"
    )
    lines = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(line, lines, dst=0)
    if rank == 0:
        print("\n".join(lines))
        print("loss before each step: " + " -> ".join(f"{value:.4f}" for value in losses))

    bridge.close()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
