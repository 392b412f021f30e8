"""A Megatron trainer hands its MPU to mpu-bridge and uses the groups it gets back.

Needs megatron-core (``pip install 'mpu-bridge[megatron]'``). Run it on 4 processes (CPU
and gloo are enough; NCCL is used when every process has a GPU)::

    torchrun --standalone --nproc-per-node 4 examples/megatron_trainer.py

megatron-core owns the MPU (CI runs this with 0.16; ``expert_tensor_parallel_size``
exists from 0.10): tensor parallel 2, expert parallel 2 with expert tensor parallel 1,
so data parallel and expert data parallel are 2. The bridge reads that MPU and borrows
its groups: every group asked for here already exists in megatron-core, so the bridge
creates none (it creates only what is missing). The example then runs an MoE layer's
collectives over them: the token all-to-all over the expert-parallel group and the
gradient all-reduce of the expert replicas over the expert-data-parallel group. Rank 0
prints one line per rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from megatron.core import parallel_state

import mpu_bridge


def main() -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1
    )

    bridge = mpu_bridge.attach(parallel_state)  # reads the MPU; borrows its groups
    experts = bridge.expert_groups(2, expert_tensor_parallel=False)  # "ep_size_2": EP + EDP groups
    hpz = bridge.zero_param_groups(2)  # ZeRO++ hpZ: blocks of 2 of the data-parallel group
    ep, edp = experts.expert_parallel, experts.expert_data_parallel
    rank = dist.get_rank()

    # MoE dispatch: token i of this rank goes to the expert on expert-parallel peer i,
    # which scales it by (its expert index + 1); the combine step sends it back.
    tokens = torch.arange(ep.world_size, dtype=torch.float32, device=device) + 10 * rank
    routed = torch.empty_like(tokens)
    dist.all_to_all_single(routed, tokens, group=ep.group)
    expert_output = routed * (ep.rank + 1)
    combined = torch.empty_like(expert_output)
    dist.all_to_all_single(combined, expert_output, group=ep.group)

    # The replicas of one expert sum their gradients over the expert-data-parallel group.
    expert_grad = torch.tensor([float(rank)], device=device)
    dist.all_reduce(expert_grad, group=edp.group)

    line = (
        f"rank {rank}: tp {list(bridge.tensor_parallel().ranks)} dp {list(bridge.data_parallel().ranks)} "
        f"ep {list(ep.ranks)}{' (borrowed)' if ep.borrowed else ''} edp {list(edp.ranks)} "
        f"hpz {list(hpz.ranks)} | tokens {tokens.tolist()} -> {combined.tolist()} "
        f"| expert grad summed over edp {expert_grad.item():g}"
    )
    lines = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(line, lines, dst=0)
    if rank == 0:
        print("\n".join(lines))
        stats = bridge.stats()
        print(f"the bridge on rank 0: {stats['created']} groups created, {stats['borrowed']} borrowed from the MPU")

    bridge.close()  # destroys only the groups the bridge created
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
