"""``mpu-bridge selfcheck``: build every group on a real fabric and prove its membership.

On every rank the self-check builds a :class:`~mpu_bridge.bridge.Bridge` (over
megatron-core's ``parallel_state`` with ``--with-megatron``, standalone otherwise),
asks it for every group it offers, and then, in each group,

* all-reduces the rank's global rank: the result must be the sum of the group's
  member ranks (a member missing, or a foreign rank joined, changes the sum);
* broadcasts from the group's source rank (``GroupInfo.src_rank``): every member
  must receive that rank;
* compares the group's ranks with the group families of :mod:`mpu_bridge.partitions`
  (the planner's arithmetic).

Without ``--with-megatron`` the sizes (``--tp``, ``--pp``, ``--cp``, ``--ep``,
``--etp``, ``--order``) are a standalone full layout, ``attach(None, tp=..., ...)``.
With ``--exports`` it also proves the bridge's exports the same way: every non-None
field of ``bridge.process_group_collection()`` (megatron-core's
``ProcessGroupCollection``) and every dim of ``bridge.device_mesh()`` and, for each
``--ep`` size above 1, of the expert mesh; each is one row of the report
(``pg_collection.tp``, ``device_mesh.dp``, ``device_mesh[ep=2].ep`` ...), its
communicator named when it is a group kind's (``reused = tensor_parallel``). A rank
in no group of a field (``pos_embd`` off the first pipeline stage) runs no
collective for it; the planner must agree.

One report (rank 0, or the launching process) gives the layout, one row per group
kind (size, number of groups, communicator created / reused / borrowed from the
MPU, all-reduce / broadcast / planner results as ``ok ranks / world``), the time of
every phase and a final ``PASS`` / ``FAIL`` line. Exit status: 0 when every check
passed, 1 when any failed or a rank died or timed out, 2 for invalid options.

Two ways to launch (the same checks either way):

* under ``torchrun --nproc-per-node N -m mpu_bridge.selfcheck ...`` (``RANK``,
  ``WORLD_SIZE`` and ``MASTER_ADDR`` set): every process is one rank; rank 0 prints;
* with no launcher: the command starts ``--nproc`` local processes itself through
  the package's one local launcher (a fork server that imported torch and
  megatron-core once, or ``spawn``; a kernel-chosen free port; a hard ``--timeout``:
  ranks still running when it passes, or some seconds after another rank died,
  are killed).

Backend: NCCL bound to ``cuda:<local rank>`` when CUDA has a GPU for every local
rank (group creation then uses ``split_group``), gloo otherwise; ``--backend``
overrides.

The parts, by job:

============  ==============================================================
``config``    :class:`SelfCheckConfig`, :func:`validate`, :func:`expected_groups`
``results``   what a rank reports (:class:`RankResult`, :class:`GroupCheck`)
``rank``      what runs on one rank: init, attach, phases, teardown
``probe``     the bridge requests, communicator classification, collectives
``launch``    the one local launcher (also used by the tests and benchmarks)
``runs``      spawned locally, or one rank under torchrun (gathering results)
``report``    :func:`format_report`
``command``   :func:`add_arguments`, :func:`config_from_args`, :func:`run`, :func:`main`
============  ==============================================================

Example (the README's main job: 8 local processes over megatron-core)::

    mpu-bridge selfcheck --nproc 8 --with-megatron --tp 2 --pp 2 --ep 2 4 --etp 1 --hpz 2 --gpus-per-node 4
    mpu-bridge selfcheck --nproc 8 --tp 2 --pp 2 --ep 2 --exports     # standalone, exports proven
    torchrun --nproc-per-node 8 -m mpu_bridge.selfcheck --with-megatron --tp 2 --ep 4

Importing this package does not import torch, so the ``mpu-bridge`` command can
list it without importing torch.
"""

from __future__ import annotations

from .command import add_arguments, config_from_args, main, run
from .config import FAULTS, SelfCheckConfig, expected_exports, expected_groups, validate
from .report import format_report
from .results import PHASES, GroupCheck, RankResult

__all__ = [
    "FAULTS",
    "PHASES",
    "GroupCheck",
    "RankResult",
    "SelfCheckConfig",
    "add_arguments",
    "config_from_args",
    "expected_exports",
    "expected_groups",
    "format_report",
    "main",
    "run",
    "validate",
]
