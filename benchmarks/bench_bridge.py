"""Benchmark: the bridge's group setup on top of megatron-core, against DeepSpeed's ``groups``.

The job, on top of an initialised megatron-core MPU (``initialize_model_parallel``
with tp, pp and expert-parallel size E), is what a MoE + ZeRO++ trainer needs
besides the MPU's own groups:

======  ======================================  ==================================================
step    mpu-bridge                              DeepSpeed (``deepspeed.utils.groups``)
======  ======================================  ==================================================
attach  ``mpu_bridge.attach(parallel_state)``   ``groups.mpu = <legacy MPU over parallel_state>``
ep=E    ``expert_groups(E)``                    ``_create_expert_data_and_model_parallel(E, mpu)``
ep=E2   ``expert_groups(E2,                     ``_create_expert_and_data_parallel(E2)``
        expert_tensor_parallel=False)``
hpZ     ``zero_param_groups(n)``                ``_create_zero_param_parallel_group(n)``
world   ``world()``                             ``_clone_world_group()``
======  ======================================  ==================================================

``ep=E`` is the MPU's own expert layout (megatron-core already holds those rank
sets); ``ep=E2`` is a second expert size without expert tensor parallelism (the
path DeepSpeed's MoE layer takes with ``enable_expert_tensor_parallelism=False``).
DeepSpeed gets a minimal legacy MPU (megatron-core's ``parallel_state`` itself lacks
``get_model_parallel_world_size``), built before the clock starts.

Sizes: 8 real gloo processes (tp 2, pp 2, ep 2; E2 4, hpZ 2) and one rank of
16,384 and of 131,072 ranks on PyTorch's ``fake`` backend (tp 8, pp 8, ep 8;
E2 16, hpZ 16). Every (size, contender, repeat) runs in a fresh process (a fresh
world of 8 processes for gloo), so no global state leaks between measurements.

Measured per rank, for the setup phase only (megatron-core's own
``initialize_model_parallel`` is timed separately, as context):

* groups created: growth of ``torch.distributed``'s ``_world.pg_map`` (groups this
  rank is a member of);
* ``new_group`` calls: growth of PyTorch's sequential group counter (one per
  all-ranks ``new_group`` call, member or not) plus the member-only groups created
  (hashed names); read from ``distributed_c10d``'s state, so nothing wraps the
  functions being timed;
* seconds: ``time.perf_counter`` around the steps, garbage collection paused; for
  gloo the slowest rank (after a barrier), for the fake backend the simulated rank.

Targets (checked, PASS/FAIL printed): the bridge creates no group for a step whose
rank sets megatron-core already holds; it creates no more groups than there are
distinct new rank sets; it is at least as fast as DeepSpeed at every size (median
of the repeats); at 131,072 ranks its whole setup costs under 1% of megatron-core's
own ``initialize_model_parallel`` in the same run.

On the ``fake`` backend the bridge skips its cross-rank plan check (``FakeStore``
cannot count) and uses member-only ``new_group`` calls. A real world after
megatron-core with pp > 1 falls back to the all-ranks ``new_group`` loop (its ranks
hold different numbers of groups: megatron's position-embedding groups live on the
first stage only), so the fake sizes also run ``bridge (new_group)``, that loop.

Usage::

    python benchmarks/bench_bridge.py            # all sizes, about 5 minutes on 2 busy cores
    python benchmarks/bench_bridge.py --quick    # without 131,072 ranks
    python benchmarks/bench_bridge.py --profile  # also cProfile the bridge at the largest fake size
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]

#: Contenders: name -> bridge creation strategy (None: DeepSpeed).
DEEPSPEED = "deepspeed"
BRIDGE = "bridge"
BRIDGE_LOOP = "bridge (new_group)"
CONTENDER_STRATEGY: Dict[str, Optional[str]] = {DEEPSPEED: None, BRIDGE: "auto", BRIDGE_LOOP: "new_group"}

STEPS = ("attach", "ep=E", "ep=E2", "hpZ", "world")

_RESULT_PREFIX = "RESULT "
_WORKER_ENV = {
    "DS_ACCELERATOR": "cpu",  # read when deepspeed is first imported
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",  # megatron-core warns about Transformer Engine / Apex
}


@dataclass(frozen=True)
class Scenario:
    """One world: its megatron-core MPU and the job on top of it."""

    world: int
    backend: str  # "gloo" (every rank a process) or "fake" (one rank simulated)
    tp: int
    pp: int
    ep: int  # megatron-core's expert-parallel size (the reusable expert layout)
    ep_other: int  # a second expert size, no expert tensor parallelism
    hpz: int  # ZeRO++ hpZ partition size
    repeats: int

    @property
    def label(self) -> str:
        how = f"{self.world} gloo procs" if self.backend == "gloo" else f"1 rank of {self.world:,}"
        return f"{how} (tp{self.tp} pp{self.pp} ep{self.ep})"

    @property
    def probe_rank(self) -> int:
        """The simulated rank on the fake backend: a middle rank that leads no group."""
        return self.world // 2 + 5

    def contenders(self) -> Tuple[str, ...]:
        if self.backend == "fake":
            return (DEEPSPEED, BRIDGE, BRIDGE_LOOP)
        return (DEEPSPEED, BRIDGE)


def scenarios(quick: bool, repeats: int) -> List[Scenario]:
    out = [
        Scenario(8, "gloo", tp=2, pp=2, ep=2, ep_other=4, hpz=2, repeats=repeats),
        Scenario(16_384, "fake", tp=8, pp=8, ep=8, ep_other=16, hpz=16, repeats=repeats),
    ]
    if not quick:
        out.append(Scenario(131_072, "fake", tp=8, pp=8, ep=8, ep_other=16, hpz=16, repeats=1))
    return out


# ---------------------------------------------------------------------------------------
# Inside a measured process (torch imported here only)
# ---------------------------------------------------------------------------------------


_NEW_GROUP_CALLS = [0]


def _count_new_group_calls() -> None:
    """Count every ``new_group`` call of this process from now on (once), however the caller
    imported it (megatron-core, the bridge, ``DeviceMesh``): all go through
    ``distributed_c10d._new_group_with_tag``.

    Counted at the call, not derived from PyTorch's group counter: which calls move that
    counter changed in torch 2.14 (member-only groups too), so a derived count is wrong on
    one line or the other."""
    from torch.distributed import distributed_c10d as c10d

    original = c10d._new_group_with_tag
    if getattr(original, "_mpu_bridge_counted", False):
        return

    def counted(*args: Any, **kwargs: Any) -> Any:
        _NEW_GROUP_CALLS[0] += 1
        return original(*args, **kwargs)

    counted._mpu_bridge_counted = True  # type: ignore[attr-defined]
    c10d._new_group_with_tag = counted


def _c10d_counts() -> Tuple[int, int]:
    """(groups this rank holds, new_group calls so far): PyTorch's live groups, and the calls
    counted since :func:`_count_new_group_calls` (installed on first use)."""
    from torch.distributed import distributed_c10d as c10d

    _count_new_group_calls()
    return len(c10d._world.pg_map), _NEW_GROUP_CALLS[0]


def _held_rank_sets() -> set:
    """Rank sets of the groups this rank holds, the default (world) group excluded."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    default = c10d._get_default_group()
    return {
        frozenset(dist.get_process_group_ranks(pg)) for pg in list(c10d._world.pg_map) if pg is not default
    }


def _digest(sets: Sequence[Sequence[int]]) -> str:
    text = json.dumps(sorted(sorted(int(r) for r in s) for s in sets))
    return hashlib.sha1(text.encode()).hexdigest()[:12]


class _Steps:
    """Times setup steps and records what each created, outside the clock."""

    def __init__(self, profiler: Any = None) -> None:
        self.profiler = profiler  # a cProfile.Profile switched on only inside the steps
        self.before_sets = _held_rank_sets()
        self.rows: List[Dict[str, Any]] = []
        self.new_sets: set = set()

    def run(self, name: str, fn: Callable[[], Any], own_sets: Callable[[Any], List[Sequence[int]]]) -> Any:
        groups0, calls0 = _c10d_counts()
        gc.disable()
        if self.profiler is not None:
            self.profiler.enable()
        try:
            start = time.perf_counter()
            value = fn()
            seconds = time.perf_counter() - start
        finally:
            if self.profiler is not None:
                self.profiler.disable()
            gc.enable()
        groups1, calls1 = _c10d_counts()
        sets = [frozenset(int(r) for r in s) for s in own_sets(value)]
        known = bool(sets) and all(s in self.before_sets for s in sets)
        self.new_sets.update(s for s in sets if s not in self.before_sets)
        self.rows.append(
            {
                "step": name,
                "seconds": seconds,
                "groups": groups1 - groups0,
                "calls": calls1 - calls0,
                "mpu_had_sets": known,
                "sets": _digest(sets) if sets else "",
            }
        )
        return value

    def result(self) -> Dict[str, Any]:
        return {
            "seconds": sum(r["seconds"] for r in self.rows),
            "groups": sum(r["groups"] for r in self.rows),
            "calls": sum(r["calls"] for r in self.rows),
            "distinct_new_sets": len(self.new_sets),
            "steps": self.rows,
        }


def _initialise_megatron(spec: Dict[str, Any]) -> Dict[str, Any]:
    from megatron.core import parallel_state

    groups0, calls0 = _c10d_counts()
    start = time.perf_counter()
    parallel_state.initialize_model_parallel(
        spec["tp"],
        spec["pp"],
        expert_model_parallel_size=spec["ep"],
        create_gloo_process_groups=False,
    )
    seconds = time.perf_counter() - start
    groups1, calls1 = _c10d_counts()
    return {"seconds": seconds, "groups": groups1 - groups0, "calls": calls1 - calls0}


class _MinimalLegacyMpu:
    """The few legacy-MPU names DeepSpeed's groups module calls, over megatron-core."""

    def __init__(self, parallel_state: Any) -> None:
        self._ps = parallel_state

    def get_tensor_model_parallel_world_size(self) -> int:
        return self._ps.get_tensor_model_parallel_world_size()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._ps.get_pipeline_model_parallel_world_size()

    def get_model_parallel_world_size(self) -> int:
        return self.get_tensor_model_parallel_world_size() * self.get_pipeline_model_parallel_world_size()

    def get_data_parallel_world_size(self) -> int:
        return self._ps.get_data_parallel_world_size()

    def get_data_parallel_group(self) -> Any:
        return self._ps.get_data_parallel_group()

    def get_data_parallel_group_ranks(self) -> List[int]:
        import torch.distributed as dist

        return dist.get_process_group_ranks(self._ps.get_data_parallel_group())


def _run_deepspeed(spec: Dict[str, Any], profiler: Any) -> Dict[str, Any]:
    import importlib
    import logging

    import torch.distributed as dist
    from megatron.core import parallel_state

    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    # No shared-memory op build (30-70 s of compiling); see ENVIRONMENT.md.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing world
    from deepspeed.utils import groups
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    legacy = _MinimalLegacyMpu(parallel_state)
    ep, ep_other = f"ep_size_{spec['ep']}", f"ep_size_{spec['ep_other']}"

    def expert_sets(name: str) -> Callable[[Any], List[Sequence[int]]]:
        return lambda _: [
            list(groups._EXPERT_PARALLEL_GROUP_RANKS[name]),
            list(groups._EXPERT_DATA_PARALLEL_GROUP_RANKS[name]),
        ]

    def attach() -> None:
        groups.mpu = legacy  # what deepspeed.initialize(mpu=...) does

    steps = _Steps(profiler)
    steps.run("attach", attach, lambda _: [])
    steps.run(
        "ep=E", lambda: groups._create_expert_data_and_model_parallel(spec["ep"], mpu=legacy), expert_sets(ep)
    )
    steps.run("ep=E2", lambda: groups._create_expert_and_data_parallel(spec["ep_other"]), expert_sets(ep_other))
    steps.run(
        "hpZ",
        lambda: groups._create_zero_param_parallel_group(spec["hpz"]),
        lambda _: [dist.get_process_group_ranks(groups._ZERO_PARAM_INTRA_PARALLEL_GROUP)],
    )
    steps.run("world", groups._clone_world_group, lambda g: [dist.get_process_group_ranks(g)])
    result = steps.result()
    result["strategy"] = "new_group"
    return result


def _run_bridge(spec: Dict[str, Any], strategy: str, profiler: Any) -> Dict[str, Any]:
    from megatron.core import parallel_state

    import mpu_bridge
    import mpu_bridge.bridge  # noqa: F401  (imported before the clock, like deepspeed)

    def expert_sets(experts: Any) -> List[Sequence[int]]:
        return [experts.expert_parallel.ranks, experts.expert_data_parallel.ranks]

    steps = _Steps(profiler)
    bridge = steps.run("attach", lambda: mpu_bridge.attach(parallel_state, strategy=strategy), lambda _: [])
    steps.run("ep=E", lambda: bridge.expert_groups(spec["ep"]), expert_sets)
    steps.run(
        "ep=E2", lambda: bridge.expert_groups(spec["ep_other"], expert_tensor_parallel=False), expert_sets
    )
    steps.run("hpZ", lambda: bridge.zero_param_groups(spec["hpz"]), lambda info: [info.ranks])
    steps.run("world", bridge.world, lambda info: [info.ranks])
    result = steps.result()
    stats = bridge.stats()
    result["strategy"] = bridge.strategy if not stats["fallbacks"] else f"{bridge.strategy}->new_group"
    result["stats"] = stats
    return result


def _measure(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Initialise megatron-core, then run one contender's setup; this rank's numbers."""
    import torch.distributed as dist

    megatron = _initialise_megatron(spec)
    if spec["backend"] != "fake":
        dist.barrier()
    strategy = CONTENDER_STRATEGY[spec["contender"]]
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
    setup = _run_deepspeed(spec, profiler) if strategy is None else _run_bridge(spec, strategy, profiler)
    if profiler is not None:
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        setup["profile"] = text.getvalue()
    return {"megatron": megatron, "setup": setup, "rank": dist.get_rank()}


def _gloo_rank(rank: int, world_size: int, spec: Dict[str, Any]) -> Dict[str, Any]:
    sys.path.insert(0, str(ROOT))
    return _measure(spec)


def _preload(spec: Dict[str, Any]) -> Tuple[str, ...]:
    """What the launcher's fork server imports once for every rank: this script (the
    ranks unpickle ``_gloo_rank`` from it), torch, megatron-core and the contender.

    8 ranks each importing torch, megatron-core and DeepSpeed on a busy 2-core
    machine took minutes; from the fork server they inherit them.
    """
    contender = "deepspeed" if spec["contender"] == DEEPSPEED else "mpu_bridge.bridge"
    return ("__main__", "torch.distributed", "megatron.core.parallel_state", contender)


def _run_gloo_world(spec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Run ``_measure`` on every rank of a gloo world of local processes; results by rank.

    The package's one local launcher (:func:`mpu_bridge.selfcheck.launch.run_ranks`):
    ranks from a fork server (``--launcher fork``) or spawned from scratch
    (``--launcher spawn``), the parent hosting the store, a hard deadline; a rank's
    exception is raised here with its traceback.
    """
    from mpu_bridge.selfcheck.launch import run_ranks

    method = "spawn" if spec.get("launcher") == "spawn" else "forkserver"
    return run_ranks(
        _gloo_rank, spec["world"], spec, timeout=spec["timeout"], env=_WORKER_ENV, preload=_preload(spec), method=method
    )


def _combine_ranks(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The slowest rank's times; the largest counts (they are equal on every rank here)."""
    first = results[0]
    out = json.loads(json.dumps(first))
    for part in ("megatron", "setup"):
        for key in ("seconds", "groups", "calls"):
            out[part][key] = max(r[part][key] for r in results)
    for i, row in enumerate(out["setup"]["steps"]):
        for key in ("seconds", "groups", "calls"):
            row[key] = max(r["setup"]["steps"][i][key] for r in results)
        row["mpu_had_sets"] = all(r["setup"]["steps"][i]["mpu_had_sets"] for r in results)
        per_rank = "|".join(r["setup"]["steps"][i]["sets"] for r in results)
        row["sets"] = hashlib.sha1(per_rank.encode()).hexdigest()[:12] if row["sets"] else ""
    out["setup"]["distinct_new_sets"] = max(r["setup"]["distinct_new_sets"] for r in results)
    out["setup"]["groups_min"] = min(r["setup"]["groups"] for r in results)
    return out


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement in this (fresh) process; called through ``--worker``."""
    sys.path.insert(0, str(ROOT))
    import torch.distributed as dist

    if spec["backend"] == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=spec["rank"], world_size=spec["world"])
        os.environ["LOCAL_RANK"] = "0"
        try:
            return _measure(spec)
        finally:
            dist.destroy_process_group()
    return _combine_ranks(_run_gloo_world(spec))


# ---------------------------------------------------------------------------------------
# The orchestrating process (no torch here)
# ---------------------------------------------------------------------------------------


def run_worker(spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    env = dict(os.environ, **_WORKER_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise SystemExit(
            f"measurement {spec['contender']} at {spec['world']} ranks took over {timeout:g} s"
        ) from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:] + "\n")
        raise SystemExit(f"measurement {spec['contender']} at {spec['world']} ranks failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(_RESULT_PREFIX) :])


def fmt_s(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    print(line(headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def _median_run(runs: List[Dict[str, Any]], part: str) -> float:
    return statistics.median(r[part]["seconds"] for r in runs)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 131,072-rank world")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender for the smaller sizes (median)")
    parser.add_argument("--profile", action="store_true", help="cProfile the bridge at the largest fake size")
    parser.add_argument("--json", metavar="PATH", help="also write every raw measurement here")
    parser.add_argument("--launcher", choices=("fork", "spawn"), default="fork",
                        help="gloo ranks: forked from a fork server that imported everything (default), "
                             "or spawned (each rank imports torch, megatron-core and DeepSpeed itself: "
                             "minutes on a busy 2-core machine); both through mpu_bridge.selfcheck.launch")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(_RESULT_PREFIX + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    load_start = os.getloadavg()
    wall_start = time.monotonic()
    print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f} "
          f"({os.cpu_count()} cores)", flush=True)
    raw: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    plan = scenarios(args.quick, args.repeats)
    for sc in plan:
        runs: Dict[str, List[Dict[str, Any]]] = {c: [] for c in sc.contenders()}
        timeout = 480.0 if sc.backend == "gloo" else 120.0 + sc.world / 2000
        for repeat in range(sc.repeats):
            for contender in sc.contenders():  # interleaved, so load drifts hit every contender
                spec = dict(asdict(sc), contender=contender, rank=sc.probe_rank, timeout=timeout,
                            launcher=args.launcher)
                result = run_worker(spec, timeout + 60)
                runs[contender].append(result)
                print(f"  {sc.label}: {contender} run {repeat + 1}/{sc.repeats}: setup "
                      f"{fmt_s(result['setup']['seconds'])}", flush=True)
        raw[sc.label] = runs

    ok = report(plan, raw)
    if args.profile:  # an extra run, not in the table: cProfile slows what it watches
        sc = [s for s in plan if s.backend == "fake"][-1]
        spec = dict(asdict(sc), contender=BRIDGE, rank=sc.probe_rank, timeout=600.0, profile=True)
        profiled = run_worker(spec, 660.0)["setup"]
        print(f"\ncProfile of the bridge's setup steps, {sc.label} (an extra run; "
              f"{fmt_s(profiled['seconds'])} under the profiler):")
        print(profiled["profile"])
    load_end = os.getloadavg()
    print(f"\nload average at end: {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"whole run {time.monotonic() - wall_start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))
    return 0 if ok else 1


def report(plan: List[Scenario], raw: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> bool:
    print()
    headers = ["size", "contender", "strategy", "groups created", "new rank sets", "reused",
               "new_group calls", "setup s (median)", "DeepSpeed / it"]
    rows: List[List[str]] = []
    step_rows: List[List[str]] = []
    checks: List[Tuple[str, bool, str]] = []
    for sc in plan:
        runs = raw[sc.label]
        megatron_runs = [r for c in runs for r in runs[c]]
        mega = megatron_runs[0]["megatron"]
        rows.append([sc.label, "megatron-core init (context)", "new_group", str(mega["groups"]), "-", "-",
                     f"{mega['calls']:,}", fmt_s(_median_run(megatron_runs, "megatron")), "-"])
        ds_time = _median_run(runs[DEEPSPEED], "setup")
        for contender in sc.contenders():
            first = runs[contender][0]["setup"]
            seconds = _median_run(runs[contender], "setup")
            reused = str(first["stats"]["reused"]) if "stats" in first else "-"
            ratio = "-" if contender == DEEPSPEED else f"{ds_time / seconds:.1f}x"
            rows.append(["", contender, first["strategy"], str(first["groups"]), str(first["distinct_new_sets"]),
                         reused,
                         f"{first['calls']:,}", fmt_s(seconds), ratio])
            step_cells = []
            for i, step in enumerate(first["steps"]):
                median = statistics.median(r["setup"]["steps"][i]["seconds"] for r in runs[contender])
                step_cells.append(f"{fmt_s(median)} / {step['groups']}")
            step_rows.append([sc.label if contender == DEEPSPEED else "", contender] + step_cells)
        bridge = runs[BRIDGE][0]["setup"]
        # Target 1: no group for a step whose rank sets megatron-core already holds.
        reusable = [s for s in bridge["steps"] if s["mpu_had_sets"]]
        wasted = [s["step"] for s in reusable if s["groups"]]
        checks.append((
            f"{sc.label}: zero new groups where the MPU has the rank sets",
            bool(reusable) and not wasted,
            f"steps whose rank sets megatron-core holds: {', '.join(s['step'] for s in reusable) or 'none'}; "
            f"groups created there: {sum(s['groups'] for s in reusable)}"
            + (f" (in {', '.join(wasted)})" if wasted else ""),
        ))
        # Target 2: no more groups than distinct new rank sets.
        checks.append((
            f"{sc.label}: groups created <= distinct new rank sets",
            bridge["groups"] <= bridge["distinct_new_sets"],
            f"created {bridge['groups']}, distinct new rank sets {bridge['distinct_new_sets']}",
        ))
        # Target 3: at least as fast as DeepSpeed.
        bridge_time = _median_run(runs[BRIDGE], "setup")
        checks.append((
            f"{sc.label}: at least as fast as DeepSpeed",
            bridge_time <= ds_time,
            f"bridge {fmt_s(bridge_time)}, DeepSpeed {fmt_s(ds_time)} ({ds_time / bridge_time:.1f}x)",
        ))
        # Target 4 (issue 12): the bridge's whole setup under 1% of megatron-core's own init.
        mega_time = _median_run(megatron_runs, "megatron")
        if sc.backend == "fake" and sc.world >= 131_072:
            checks.append((
                f"{sc.label}: bridge setup (attach + derived groups) under 1% of megatron-core's init",
                bridge_time < 0.01 * mega_time,
                f"bridge {fmt_s(bridge_time)} = {100 * bridge_time / mega_time:.2f}% of {fmt_s(mega_time)}",
            ))
        if BRIDGE_LOOP in runs:
            loop_time = _median_run(runs[BRIDGE_LOOP], "setup")
            checks.append((
                f"{sc.label}: (also) bridge with the all-ranks new_group fallback at least as fast",
                loop_time <= ds_time,
                f"{fmt_s(loop_time)} vs DeepSpeed {fmt_s(ds_time)} ({ds_time / loop_time:.1f}x)",
            ))
        # Same job: the expert groups must hold the same rank sets in both contenders.
        ds_steps = {s["step"]: s["sets"] for s in runs[DEEPSPEED][0]["setup"]["steps"]}
        same = [s["step"] for s in bridge["steps"] if s["sets"] and s["sets"] == ds_steps.get(s["step"])]
        differ = [s["step"] for s in bridge["steps"] if s["sets"] and s["sets"] != ds_steps.get(s["step"])]
        checks.append((
            f"{sc.label}: same rank sets as DeepSpeed's groups (required: ep=E, ep=E2)",
            {"ep=E", "ep=E2"} <= set(same),
            f"same: {', '.join(same) or 'none'}; different: {', '.join(differ) or 'none'}"
            + (" (hpZ: DeepSpeed's blocks ignore model parallelism, the bridge's follow the "
               "data-parallel group)" if "hpZ" in differ else ""),
        ))
        # Every repeat must have created the same numbers.
        for contender in sc.contenders():
            counts = {(r["setup"]["groups"], r["setup"]["calls"]) for r in runs[contender]}
            if len(counts) > 1:
                checks.append((f"{sc.label}: {contender} counts stable across repeats", False, str(counts)))

    print("Setup cost per rank on top of megatron-core (counts: this rank; new rank sets: distinct "
          "rank sets among this rank's requested groups that megatron-core does not hold; "
          "seconds: median of the runs, gloo: slowest rank)")
    print_table(headers, rows)
    print("\nPer step, median seconds / groups created (attach = read the MPU; DeepSpeed: set groups.mpu)")
    print_table(["size", "contender"] + list(STEPS), step_rows)
    print("\nTargets")
    ok = True
    for name, passed, detail in checks:
        ok &= passed
        print(f"  {'PASS' if passed else 'FAIL'}  {name}: {detail}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
