"""A megatron-core model over the bridge's ``ProcessGroupCollection``, without ``parallel_state``.

Needs megatron-core >= 0.15 (``pip install 'mpu-bridge[megatron]'``). Run it on 4
processes (CPU and gloo are enough)::

    torchrun --standalone --nproc-per-node 4 examples/pg_collection.py

``attach(None, tp=2)`` lays out 4 ranks as megatron-core would (tensor parallel 2, data
parallel 2) and ``bridge.process_group_collection()`` returns megatron-core's own
``ProcessGroupCollection`` over the bridge's groups. A small tensor-parallel ``GPTModel``
(MLP-only layers, as megatron-core's attention needs CUDA; CPU initialisation) takes it
as ``pg_collection=`` and runs one forward and backward; megatron-core's
``parallel_state`` is never initialised. Both tensor-parallel ranks of a replica compute
the same loss; the two data-parallel replicas see other data. Rank 0 prints one line
per rank.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

import mpu_bridge

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # megatron-core warns about optional packages it lacks
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

VOCAB, SEQUENCE = 32, 8


def mlp_only_layer() -> ModuleSpec:
    """megatron-core's local layer spec without attention (its attention needs CUDA)."""
    local = get_gpt_layer_local_spec()
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=local.submodules.pre_mlp_layernorm,
            mlp=local.submodules.mlp,
            mlp_bda=local.submodules.mlp_bda,
        ),
    )


def gpt_loss(pgc: Any, data_seed: int) -> float:
    """One forward and backward of a small tensor-parallel ``GPTModel`` over the collection
    ``pgc``, on tokens drawn from ``data_seed``; the loss (the other examples use it too)."""
    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, tensor_model_parallel_size=pgc.tp.size(),
        cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native",  # takes pg_collection.tp
    )
    torch.manual_seed(0)
    model = GPTModel(config, mlp_only_layer(), vocab_size=VOCAB, max_sequence_length=SEQUENCE, pg_collection=pgc)
    data = torch.Generator().manual_seed(data_seed)
    tokens = torch.randint(0, VOCAB, (2, SEQUENCE), generator=data)
    labels = torch.randint(0, VOCAB, (2, SEQUENCE), generator=data)
    position = torch.arange(SEQUENCE).unsqueeze(0).expand(2, SEQUENCE).contiguous()
    loss = model(tokens, position, attention_mask=None, labels=labels).mean()
    loss.backward()
    return float(loss.item())


def main() -> None:
    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR
    bridge = mpu_bridge.attach(None, tp=2)  # tp 2, dp 2 on 4 ranks; no parallel_state
    pgc = bridge.process_group_collection()  # megatron-core's ProcessGroupCollection
    loss = gpt_loss(pgc, data_seed=1 + pgc.dp.rank())  # other data on each dp replica
    rank = dist.get_rank()
    line = (
        f"rank {rank}: tp {dist.get_process_group_ranks(pgc.tp)} (rank {pgc.tp.rank()}) "
        f"dp {dist.get_process_group_ranks(pgc.dp)} (rank {pgc.dp.rank()}) "
        f"| pgc.tp is the bridge's: {pgc.tp is bridge.tensor_parallel().group} | loss {loss:.6f}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(str(text) for text in lines))
        print(f"parallel_state initialised: {parallel_state.model_parallel_is_initialized()}")
    bridge.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
