"""A two-module trainer (an encoder and a language model on rank spans of their own),
without ``parallel_state``.

Needs megatron-core >= 0.17 (``MultiModuleProcessGroupCollection``). Run it on 4
processes (CPU and gloo are enough)::

    torchrun --standalone --nproc-per-node 4 examples/multi_module.py

The encoder runs on ranks 0..1 (data parallel 2), the language model on ranks 2..3
(tensor parallel 2): megatron-core's ``rank_offset`` / ``local_world_size``. Every rank
builds both modules' bridges and the multi-module collection (as every rank builds every
module's grid in megatron-core); only a module's ranks create and hold its groups. Each
rank then attaches the module it runs, read back from the collection (nothing created):
the language model's ranks run a small tensor-parallel ``GPTModel`` (MLP-only layers, see
``examples/pg_collection.py``) forward and backward over it, the encoder's ranks an
all-reduce over their data-parallel group. Rank 0 prints one line per rank.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

import mpu_bridge

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns about optional packages it lacks
    from pg_collection import gpt_loss  # the example beside this one


def main() -> None:
    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR
    encoder = mpu_bridge.attach(None, tp=1, local_world_size=2)  # ranks 0, 1
    llm = mpu_bridge.attach(None, tp=2, rank_offset=2, local_world_size=2)  # ranks 2, 3
    multi = mpu_bridge.multi_module_collection({"encoder": encoder, "llm": llm}, language_model="llm")
    module = next(iter(multi.module_pgs))  # the module this rank runs
    bridge = mpu_bridge.attach(multi, module=module)  # read back from the collection
    pgc = bridge.process_group_collection()
    own = pgc.tp is multi.module_pgs[module].tp and pgc.dp is multi.module_pgs[module].dp
    if module == "llm":
        work = f"loss {gpt_loss(pgc, data_seed=1):.6f}"
    else:
        value = torch.ones(1)
        dist.all_reduce(value, group=pgc.dp)
        work = f"dp sum {value.item():.0f}"
    line = (
        f"rank {dist.get_rank()}: {module} on ranks {list(bridge.layout.ranks)} | tp "
        f"{dist.get_process_group_ranks(pgc.tp)} dp {dist.get_process_group_ranks(pgc.dp)} | language model: "
        f"{multi.language_model_module_name} | the module's own groups: {own}, created "
        f"{bridge.stats()['created']} | {work}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if dist.get_rank() == 0:
        print("\n".join(str(text) for text in lines))
    for each in (bridge, encoder, llm):
        each.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
