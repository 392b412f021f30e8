"""The running PyTorch's rule for member-only group names, observed independently of the bridge.

Tests whose expected strategy depends on the rule ask :func:`member_only_moves_counter`,
which watches PyTorch itself (never a version string): it creates one member-only group
in a throwaway one-rank ``fake`` world and reports whether PyTorch's group counter moved.
Up to torch 2.13 it does not (the salt is the number of groups held); from 2.14 it does
(the salt is the counter).
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


@functools.lru_cache(maxsize=None)
def member_only_moves_counter() -> bool:
    """Whether creating a member-only group advances ``_world.group_count`` (call with no world)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("member_only_moves_counter() needs torch.distributed uninitialised")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        before = c10d._world.group_count
        dist.new_group([0], use_local_synchronization=True)
        return c10d._world.group_count - before == 1
    finally:
        dist.destroy_process_group()
