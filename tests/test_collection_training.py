"""A ``GPTModel`` over ``attach(collection).process_group_collection()`` trains exactly as one
over the original collection (issue 18: Megatron without ``parallel_state``).

4 gloo ranks, no ``parallel_state``: a standalone bridge (tp 2, dp 2) exports megatron-core's
``ProcessGroupCollection``; a second bridge attaches to that collection and exports its
own. Two tensor-parallel ``GPTModel``s (MLP-only layers, as in ``examples/pg_collection.py``:
megatron-core's attention needs CUDA) with the same seed train three SGD steps, one over
each collection, on the same data: every loss and every parameter is bitwise equal, on
every rank, and the second collection holds the first one's group objects.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

import pytest

from _multiproc import run_ranks
from mpu_bridge.optional import is_available

pytestmark = pytest.mark.skipif(
    not is_available("megatron.core.process_groups_config"),
    reason="needs megatron-core >= 0.15 (ProcessGroupCollection)",
)

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")
STEPS = 3


def _train(pgc: Any, spec: Any) -> Dict[str, Any]:
    import torch
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
        params_dtype=torch.float32, pipeline_dtype=torch.float32, tensor_model_parallel_size=pgc.tp.size(),
        cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="native",
    )
    torch.manual_seed(0)
    model = GPTModel(config, spec, vocab_size=32, max_sequence_length=8, pg_collection=pgc)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1 + pgc.dp.rank())
    losses: List[float] = []
    for _ in range(STEPS):
        tokens = torch.randint(0, 32, (2, 8), generator=data)
        labels = torch.randint(0, 32, (2, 8), generator=data)
        position = torch.arange(8).unsqueeze(0).expand(2, 8).contiguous()
        loss = model(tokens, position, attention_mask=None, labels=labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"losses": losses, "params": [p.detach().clone() for p in model.parameters()]}


def _two_models(rank: int, world: int) -> Dict[str, Any]:
    import warnings

    import torch

    import mpu_bridge

    sys.path.insert(0, EXAMPLES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pg_collection import mlp_only_layer

    first = mpu_bridge.attach(None, tp=2)
    original = first.process_group_collection()
    second = mpu_bridge.attach(original)
    again = second.process_group_collection()
    a, b = _train(original, mlp_only_layer()), _train(again, mlp_only_layer())
    obs = {
        "losses": (a["losses"], b["losses"]),
        "params_equal": len(a["params"]) == len(b["params"])
        and all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])),
        "same_tp": again.tp is original.tp, "same_dp": again.dp is original.dp,
        "created_by_second": second.stats()["created"],
    }
    second.close()
    first.close()
    return obs


def test_a_model_over_the_attached_collection_trains_exactly_as_over_the_original():
    observed = run_ranks(_two_models, 4)
    for obs in observed:
        original, attached = obs["losses"]
        assert original == attached
        assert len(set(original)) == STEPS  # it trained: the loss moved every step
        assert obs["params_equal"]
        assert obs["same_tp"] and obs["same_dp"]
        assert obs["created_by_second"] == 0
    # tensor-parallel peers compute one loss; the data-parallel replicas see other data
    assert observed[0]["losses"] == observed[1]["losses"]
    assert observed[0]["losses"] != observed[2]["losses"]
