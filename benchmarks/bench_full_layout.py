"""Benchmark: one rank's whole Megatron group set, standalone, against megatron-core and DeviceMesh.

The job: every process group one rank needs for a full Megatron layout -- every field
of megatron-core's ``ProcessGroupCollection`` -- on one simulated rank of a large world
(PyTorch's ``fake`` backend), with nothing initialised before:

===================  ==================================================================
contender            what runs inside the clock
===================  ==================================================================
bridge               ``mpu_bridge.attach(None, tp=, pp=, cp=, ep=, etp=)`` then
                     ``bridge.process_group_collection()`` (every field)
megatron (gloo on)   ``parallel_state.initialize_model_parallel(...)``, same sizes,
                     ``create_gloo_process_groups=True`` (megatron-core's default)
megatron (gloo off)  the same with ``create_gloo_process_groups=False``
init_device_mesh     ``init_device_mesh("cpu", (pp, dp, cp, tp))`` -- the dense dims only
                     (size-1 dims left out), so it does less than the others
===================  ==================================================================

Layouts: ``tp8 pp8 ep8`` (etp = tp) and ``tp4 pp4 cp2 ep8 etp2`` (context parallelism,
expert tensor parallelism unlike tp), megatron-core's default order, at 16,384, 131,072
and 1,048,576 ranks; the simulated rank is ``world // 2 + 5``. Every (size, layout,
contender, repeat) runs in a fresh process; imports (torch, megatron-core, mpu-bridge)
happen before the clock, in every contender alike.

Columns, per rank:

* *seconds*: ``time.perf_counter`` around the job, garbage collection paused (median
  of ``--repeats`` runs at 16,384 ranks, one run above);
* *peak RSS* and *RSS growth*: the process's peak resident memory (``VmHWM``, reset
  just before the job through ``/proc/self/clear_refs``) and that peak minus the
  resident memory just before the job -- what the job itself costs, C++ included;
* *groups*: process groups created on this rank (growth of ``distributed_c10d``'s
  ``pg_map``); *rank sets*: for the bridge, the distinct rank sets among the
  collection's groups other than the whole world (the default group holds that one);
  for megatron-core, the distinct rank sets among the groups it created;
* *new_group calls*: all-ranks ``new_group`` calls on this rank (PyTorch's group
  counter) plus member-only groups.

Targets (PASS/FAIL printed; exit status 1 on a FAIL): at 131,072 ranks the bridge at
least 100x faster than megatron-core's init (both gloo settings) and at least 5x faster
than ``init_device_mesh``; at 1,048,576 ranks under 1 s and under 500 MB of RSS growth;
at every size the bridge creates exactly its distinct rank sets.

megatron-core and ``init_device_mesh`` make every rank enter every group: at 1,048,576
ranks that is minutes per run, so they run there only with ``--full``.

Usage::

    python benchmarks/bench_full_layout.py            # about 4 minutes on 2 busy cores
    python benchmarks/bench_full_layout.py --quick    # 16,384 ranks only
    python benchmarks/bench_full_layout.py --full     # megatron-core and the mesh at 1M too
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from bench_bridge import _c10d_counts  # (groups held, new_group calls) from PyTorch's bookkeeping

ROOT = Path(__file__).resolve().parents[1]

BRIDGE = "bridge"
MEGATRON_GLOO = "megatron (gloo on)"
MEGATRON = "megatron (gloo off)"
MESH = "init_device_mesh"
CONTENDERS = (BRIDGE, MEGATRON_GLOO, MEGATRON, MESH)

SIZES = (16_384, 131_072, 1_048_576)
_RESULT_PREFIX = "RESULT "
_WORKER_ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@dataclass(frozen=True)
class Layout:
    """The sizes of one full Megatron layout (megatron-core's default order)."""

    tp: int
    pp: int
    cp: int = 1
    ep: int = 1
    etp: Optional[int] = None  # None: etp = tp, as megatron-core

    @property
    def label(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}"]
        parts += [f"cp{self.cp}"] if self.cp > 1 else []
        parts += [f"ep{self.ep}"] if self.ep > 1 else []
        parts += [f"etp{self.etp}"] if self.etp is not None else []
        return " ".join(parts)

    def dp(self, world: int) -> int:
        return world // (self.tp * self.pp * self.cp)


LAYOUTS = (Layout(tp=8, pp=8, ep=8), Layout(tp=4, pp=4, cp=2, ep=8, etp=2))


# ---------------------------------------------------------------------------------------
# Inside a measured process (torch imported here only)
# ---------------------------------------------------------------------------------------


def _rss_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process in MB, from ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux: write 5 to ``/proc/self/clear_refs``)."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def _rank_sets(groups: Sequence[Any], world: int) -> int:
    """Distinct rank sets among ``groups`` (objects, None or lists of them), the world left out."""
    import torch.distributed as dist

    sets = set()
    for group in groups:
        for g in group if isinstance(group, list) else [group]:
            if g is not None:
                ranks = frozenset(dist.get_process_group_ranks(g))
                if len(ranks) < world:
                    sets.add(ranks)
    return len(sets)


def _gloo_twins_on_fake(dist: Any) -> None:
    """Let megatron-core's gloo twins be created on the fake world (which has no gloo: a
    ``ProcessGroupGloo`` over a ``FakeStore`` is not implemented): ``new_group(backend=
    "gloo")`` becomes a fake group. Real gloo twins cost more (TCP pairs with every peer),
    so this understates megatron-core's gloo-on time."""
    real = dist.new_group

    def new_group(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = None
        return real(*args, **kwargs)

    dist.new_group = new_group


def _prepare(contender: str, layout: Layout, world: int) -> Tuple[Callable[[], Any], Callable[[Any], int]]:
    """Imports done; returns (the job, how to count the distinct rank sets it produced)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if contender == BRIDGE:
        import megatron.core.process_groups_config  # noqa: F401 - imported before the clock

        import mpu_bridge.pg_collection  # noqa: F401 - imported lazily by the bridge
        from mpu_bridge import attach

        def job() -> Any:
            bridge = attach(None, tp=layout.tp, pp=layout.pp, cp=layout.cp, ep=layout.ep,
                                       etp=layout.etp)
            return bridge.process_group_collection()

        def sets(pgc: Any) -> int:
            from dataclasses import fields

            return _rank_sets([getattr(pgc, f.name) for f in fields(pgc)], world)

        return job, sets
    if contender in (MEGATRON, MEGATRON_GLOO):
        from megatron.core import parallel_state

        if contender == MEGATRON_GLOO:
            _gloo_twins_on_fake(dist)
        before = set(c10d._world.pg_map)

        def job() -> Any:
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
                context_parallel_size=layout.cp, expert_model_parallel_size=layout.ep,
                expert_tensor_parallel_size=layout.etp, create_gloo_process_groups=contender == MEGATRON_GLOO,
            )

        return job, lambda _: _rank_sets([g for g in c10d._world.pg_map if g not in before], world)
    from torch.distributed.device_mesh import init_device_mesh

    dims = [("pp", layout.pp), ("dp", layout.dp(world)), ("cp", layout.cp), ("tp", layout.tp)]
    dims = [(n, s) for n, s in dims if s > 1]
    before = set(c10d._world.pg_map)

    def job() -> Any:
        return init_device_mesh("cpu", tuple(s for _, s in dims), mesh_dim_names=tuple(n for n, _ in dims))

    return job, lambda _: _rank_sets([g for g in c10d._world.pg_map if g not in before], world)


def measure(contender: str, layout: Layout, world: int) -> Dict[str, Any]:
    """Run one contender once in this process (a fresh one) and measure it."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    rank = world // 2 + 5
    dist.init_process_group("fake", rank=rank, world_size=world, store=FakeStore())
    job, count_sets = _prepare(contender, layout, world)
    groups0, calls0 = _c10d_counts()
    gc.collect()
    _reset_peak()
    rss0 = _rss_mb("VmRSS")
    gc.disable()
    start = time.perf_counter()
    value = job()
    seconds = time.perf_counter() - start
    gc.enable()
    peak = _rss_mb("VmHWM")
    groups1, calls1 = _c10d_counts()
    return {
        "contender": contender, "layout": layout.label, "world": world, "seconds": seconds,
        "peak_rss_mb": peak, "rss_growth_mb": max(0.0, peak - rss0),
        "groups": groups1 - groups0, "calls": calls1 - calls0, "rank_sets": count_sets(value),
    }


def _worker(spec: str) -> None:
    raw = json.loads(spec)
    result = measure(raw["contender"], Layout(**raw["layout"]), raw["world"])
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------


def _run(contender: str, layout: Layout, world: int, timeout: float) -> Dict[str, Any]:
    spec = json.dumps({"contender": contender, "layout": asdict(layout), "world": world})
    env = {**os.environ, **_WORKER_ENV, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(f"{contender} at {world:,} ({layout.label}) failed:\n{proc.stderr[-3000:]}")


def _median(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The run with the median time (its memory and counts with it)."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    return {**ordered[len(ordered) // 2], "runs": len(runs)}


def collect(sizes: Sequence[int], repeats: int, full: bool) -> List[Dict[str, Any]]:
    rows = []
    for world in sizes:
        for layout in LAYOUTS:
            contenders = CONTENDERS if (world < 1_048_576 or full) else (BRIDGE,)
            n = repeats if world <= 16_384 else 1
            runs: Dict[str, List[Dict[str, Any]]] = {c: [] for c in contenders}
            for _ in range(n):  # contenders interleaved, so drift hits all alike
                for contender in contenders:
                    runs[contender].append(_run(contender, layout, world, timeout=3600))
                    print(f"  {world:>9,} {layout.label:<22} {contender:<20} "
                          f"{runs[contender][-1]['seconds']:8.3f} s", file=sys.stderr, flush=True)
            rows += [_median(r) for r in runs.values()]
    return rows


def _table(rows: List[Dict[str, Any]]) -> List[str]:
    out = ["| ranks | layout | contender | seconds | bridge faster | peak RSS MB | RSS growth MB | groups "
           "| rank sets | new_group calls |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bridge = _find(rows, BRIDGE, r["layout"], r["world"])
        ratio = "" if r["contender"] == BRIDGE or bridge is None else f"{r['seconds'] / bridge['seconds']:,.0f}x"
        out.append(
            f"| {r['world']:,} | {r['layout']} | {r['contender']} | {r['seconds']:.3f} | {ratio} "
            f"| {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | {r['groups']} | {r['rank_sets']} "
            f"| {r['calls']:,} |"
        )
    return out


def _find(rows: List[Dict[str, Any]], contender: str, layout: str, world: int) -> Optional[Dict[str, Any]]:
    return next((r for r in rows if (r["contender"], r["layout"], r["world"]) == (contender, layout, world)), None)


def targets(rows: List[Dict[str, Any]]) -> List[Tuple[str, bool]]:
    """(description, passed) for every target the measured rows allow checking."""
    checks = []
    for r in rows:
        if r["contender"] != BRIDGE:
            continue
        where = f"{r['world']:,} ranks, {r['layout']}"
        checks.append((f"{where}: groups created ({r['groups']}) = distinct rank sets ({r['rank_sets']})",
                       r["groups"] == r["rank_sets"]))
        if r["world"] == 131_072:
            for other, factor in ((MEGATRON_GLOO, 100), (MEGATRON, 100), (MESH, 5)):
                peer = _find(rows, other, r["layout"], r["world"])
                if peer is not None:
                    ratio = peer["seconds"] / r["seconds"]
                    checks.append((f"{where}: >= {factor}x faster than {other} ({ratio:,.0f}x)", ratio >= factor))
        if r["world"] == 1_048_576:
            checks.append((f"{where}: under 1 s ({r['seconds']:.3f} s)", r["seconds"] < 1.0))
            checks.append((f"{where}: under 500 MB of RSS growth ({r['rss_growth_mb']:.0f} MB; peak RSS "
                           f"{r['peak_rss_mb']:.0f} MB with torch and megatron-core loaded)",
                           r["rss_growth_mb"] < 500))
    return checks


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="16,384 ranks only")
    parser.add_argument("--full", action="store_true", help="megatron-core and the mesh at 1,048,576 ranks too")
    parser.add_argument("--repeats", type=int, default=3, help="runs per contender at 16,384 ranks (median)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    rows = collect(SIZES[:1] if args.quick else SIZES, args.repeats, args.full)
    print(f"One simulated rank (fake backend); load average {load:.2f} at the start, "
          f"{time.perf_counter() - started:.0f} s in all.\n")
    print("\n".join(_table(rows)) + "\n")
    failed = 0
    for text, ok in targets(rows):
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
        failed += not ok
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
