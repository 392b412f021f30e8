"""The bridge's groups as a PyTorch ``DeviceMesh``: DTensor and FSDP2 over them, and back.

Needs only torch. Run it on 4 processes (CPU and gloo are enough)::

    torchrun --standalone --nproc-per-node 4 examples/device_mesh.py

``attach(None, tp=2)`` lays out 4 ranks as megatron-core would: tensor parallel 2, data
parallel 2. ``bridge.device_mesh(("dp", "tp"))`` is a 2 x 2 ``DeviceMesh`` built from the
bridge's own groups (no new communicator): ``mesh["tp"].get_group()`` is the bridge's
tensor-parallel group. Over it, DTensor shards a tensor by rows over ``dp`` and gathers
it back (an all-gather over the dp group), and sums a ``Partial`` value over ``tp`` (an
all-reduce over the tp group). FSDP2's ``fully_shard`` over ``mesh["dp"]`` trains a
small model for 2 SGD steps, equal to one process training it on the whole batch.
Finally ``attach(mesh)`` reads the mesh as an MPU (flavour ``device-mesh``): it borrows
the mesh's groups, which are the first bridge's, and creates none. Rank 0 prints one
line per rank and what each bridge created.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

import mpu_bridge

STEPS = 2


def train(model: torch.nn.Module, batches, index: int = 0, parts: int = 1) -> None:
    """``STEPS`` SGD steps; this rank takes part ``index`` of ``parts`` of each batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x.chunk(parts)[index]), y.chunk(parts)[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def fsdp2_equals_one_process(mesh) -> bool:
    """FSDP2 ``fully_shard`` over ``mesh["dp"]`` trains like one process on the whole batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    data = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=data), torch.randn(8, 2, generator=data)) for _ in range(STEPS)]
    fully_shard(model, mesh=mesh["dp"])
    train(model, batches, mesh["dp"].get_local_rank(), mesh["dp"].size())
    train(reference, batches)  # one process, the whole batch
    trained = {name: value.full_tensor() for name, value in model.state_dict().items()}
    return all(torch.allclose(trained[k], v, atol=1e-6) for k, v in reference.state_dict().items())


def main() -> None:
    dist.init_process_group("gloo")  # torchrun set RANK, WORLD_SIZE, MASTER_ADDR
    bridge = mpu_bridge.attach(None, tp=2)  # tp 2, dp 2 on 4 ranks, no MPU
    mesh = bridge.device_mesh(("dp", "tp"))  # a 2 x 2 DeviceMesh over the bridge's own groups
    own = mesh["tp"].get_group() is bridge.tensor_parallel().group  # no new communicator
    rank = dist.get_rank()

    # DTensor: rows sharded over dp, gathered back over dp; a Partial value summed over tp
    weights = torch.arange(8.0).reshape(4, 2)
    rows = distribute_tensor(weights, mesh, [Shard(0), Replicate()])
    gathered = rows.redistribute(mesh, [Replicate(), Replicate()]).to_local()
    partial = DTensor.from_local(torch.tensor([float(rank)]), mesh, [Replicate(), Partial()])
    tp_sum = partial.redistribute(mesh, [Replicate(), Replicate()]).to_local()

    # FSDP2 over the dp dim: each dp rank trains on its half of every batch (FSDP2 runs on
    # CPU from torch 2.7: torch 2.6's needs torch.cpu.Stream.record_event, which it lacks)
    equal = fsdp2_equals_one_process(mesh) if hasattr(torch.cpu.Stream, "record_event") else "skipped"

    again = mpu_bridge.attach(mesh)  # the mesh read as an MPU: flavour "device-mesh"

    borrowed = again.tensor_parallel().group is bridge.tensor_parallel().group
    borrowed = borrowed and again.data_parallel().group is bridge.data_parallel().group

    line = (
        f"rank {rank}: coordinate {tuple(mesh.get_coordinate())} | mesh['tp'] is the bridge's tp group: {own} "
        f"| rows {rows.to_local().tolist()} | gathered over dp: {torch.equal(gathered, weights)} "
        f"| tp sum {int(tp_sum.item())} | fsdp2 {STEPS} steps equal to one process: {equal} "
        f"| attach(mesh): {again.reader.flavour}, the same groups: {borrowed}"
    )
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(f"mesh {mesh.mesh.tolist()}, dims {mesh.mesh_dim_names}")
        print("\n".join(str(text) for text in lines))
        print(f"groups created on rank 0: attach(None) {bridge.stats()['created']}, "
              f"attach(mesh) {again.stats()['created']}")
    again.close()
    bridge.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
