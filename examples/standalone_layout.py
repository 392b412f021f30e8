"""A full Megatron layout without megatron-core: the bridge creates each group on first use.

Needs only torch. Run it on 4 processes (CPU and gloo are enough)::

    torchrun --standalone --nproc-per-node 4 examples/standalone_layout.py

``attach(None, tp=2, ep=2, etp=1)`` lays out 4 ranks as megatron-core would (order
``tp-cp-ep-dp-pp``): tensor parallel 2, data parallel 2, expert parallel 2 with expert
tensor parallel 1. Every group is created on first use, one communicator per rank set:
the expert-parallel group has the tensor-parallel ranks, so it is the same object. Rank
0 prints one line per rank and the number of groups the bridge created.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import mpu_bridge


def main() -> None:
    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR
    bridge = mpu_bridge.attach(None, tp=2, ep=2, etp=1)  # a full layout, no MPU
    tp, dp = bridge.tensor_parallel(), bridge.data_parallel()
    experts = bridge.expert_groups(2)  # the layout's own expert groups
    shared = experts.expert_parallel.group is tp.group  # equal rank sets: one communicator
    rank = dist.get_rank()

    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=dp.group)  # gradients of one replica set, summed over dp
    line = (
        f"rank {rank}: tp {list(tp.ranks)} dp {list(dp.ranks)} ep {list(experts.expert_parallel.ranks)} "
        f"edp {list(experts.expert_data_parallel.ranks)} | ep is tp's communicator: {shared} "
        f"| dp sum {int(total.item())}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(str(text) for text in lines))
        print(f"the bridge on rank 0: {bridge.stats()['created']} groups created")
    bridge.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
