"""A trainer on megatron-core's ``HyperCommGrid`` (Megatron-Bridge's decentralized process
groups), without ``parallel_state``.

Needs megatron-core with ``HyperCommGrid`` (>= 0.15) and einops. Run it on 4 processes
(CPU and gloo are enough)::

    torchrun --standalone --nproc-per-node 4 examples/grid_trainer.py

The trainer describes its layout as a grid (tensor parallel 2, data parallel 2) and
creates the groups it uses itself, with ``grid.create_pg``. ``attach(grid)`` reads the
grid as the layout, borrows those groups and exports megatron-core's
``ProcessGroupCollection`` over them (what the grid lacks is created once, one
communicator per rank set). A small tensor-parallel ``GPTModel`` (MLP-only layers, see
``examples/pg_collection.py``) runs one forward and backward over it. Rank 0 prints one
line per rank.
"""

from __future__ import annotations

import warnings

import torch.distributed as dist

import mpu_bridge

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns about optional packages it lacks
    from megatron.core.hyper_comm_grid import HyperCommGrid
    from pg_collection import gpt_loss  # the example beside this one


def main() -> None:
    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR
    grid = HyperCommGrid([2, 2], ["tp", "dp"])  # megatron-core's order: tp fastest
    tp, dp = grid.create_pg("tp"), grid.create_pg("dp")  # the trainer's own groups
    bridge = mpu_bridge.attach(grid)  # the grid's layout; its groups borrowed
    pgc = bridge.process_group_collection()  # megatron-core's collection over them
    loss = gpt_loss(pgc, data_seed=1 + pgc.dp.rank())  # other data on each dp replica

    line = (
        f"rank {dist.get_rank()}: tp {dist.get_process_group_ranks(pgc.tp)} dp {dist.get_process_group_ranks(pgc.dp)} "
        f"| the grid's groups: {pgc.tp is tp and pgc.dp is dp} | loss {loss:.6f}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        print("\n".join(str(text) for text in lines))
    bridge.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
