"""Benchmark: mpu-bridge's layout engine against megatron-core's RankGenerator.

Two questions, at 1,024 / 131,072 / 1,048,576 ranks:

1. *One rank's group.* What a rank needs at start-up: ours is ``plan()`` +
   ``Layout.group_of(kind, rank)`` with the geometry cache cleared first (cold),
   and ``group_of`` alone on a built layout (warm). megatron-core has no
   ``group_of``; its way is ``RankGenerator(...)`` + ``get_ranks(token)`` + a
   scan for the group that holds the rank.
2. *Every group of a kind.* ``Layout.groups(kind)`` against
   ``RankGenerator.get_ranks(token)``.

Answers are checked against megatron-core's (the found group always, the full
lists up to 131,072 ranks); the script stops on a difference. Times are
``time.perf_counter`` with garbage collection paused (as ``timeit`` does);
small operations are repeated and the median reported. megatron-core's
enumeration is pure Python and takes seconds per kind at a million ranks, so by
default only the one-dimension kinds are run there (``--full`` runs all of
them, ``--quick`` trims repeats and kinds further).

Usage::

    python benchmarks/bench_layout.py            # about a minute
    python benchmarks/bench_layout.py --quick    # about half a minute
    python benchmarks/bench_layout.py --full     # every kind at every size (~3 minutes)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpu_bridge import layout as layout_module  # noqa: E402
from mpu_bridge import plan  # noqa: E402

#: kind -> (megatron-core generator, its token), as initialize_model_parallel uses them
MEGATRON_TOKEN: Dict[str, Tuple[str, str]] = {
    "tp": ("dense", "tp"),
    "cp": ("dense", "cp"),
    "dp": ("dense", "dp"),
    "pp": ("dense", "pp"),
    "dp-cp": ("dense", "dp-cp"),
    "tp-cp": ("dense", "tp-cp"),
    "tp-dp": ("dense", "tp-dp"),
    "tp-dp-cp": ("dense", "tp-dp-cp"),
    "mp": ("dense", "tp-pp"),
    "ep": ("expert", "ep"),
    "etp": ("expert", "tp"),
    "edp": ("expert", "dp"),
    "etp-ep": ("expert", "tp-ep"),
    "etp-ep-pp": ("expert", "tp-ep-pp"),
}

ORDER = "tp-cp-ep-dp-pp"


@dataclass(frozen=True)
class Scenario:
    world: int
    tp: int
    pp: int
    cp: int
    ep: int
    megatron_kinds: Tuple[str, ...]  # kinds timed against megatron-core (all kinds: ours)
    megatron_repeats: int
    our_enumeration_repeats: int

    @property
    def label(self) -> str:
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return f"{self.world:,} ranks (tp{self.tp} pp{self.pp}{cp} ep{self.ep})"

    @property
    def probe_rank(self) -> int:
        """A rank three quarters into the world: not the first group megatron scans."""
        return self.world * 3 // 4 + 5

    def plan(self):
        return plan(self.world, tp=self.tp, pp=self.pp, cp=self.cp, ep=self.ep, order=ORDER)


ALL_KINDS = tuple(MEGATRON_TOKEN)
HEADLINE_KINDS = ("tp", "ep", "etp", "dp", "edp", "pp")


def scenarios(mode: str) -> List[Scenario]:
    big_kinds = ALL_KINDS if mode == "full" else HEADLINE_KINDS if mode == "default" else ("tp",)
    mid_kinds = ALL_KINDS if mode != "quick" else HEADLINE_KINDS
    return [
        Scenario(1024, 8, 4, 1, 8, ALL_KINDS, 20 if mode != "quick" else 5, 20),
        Scenario(131_072, 8, 4, 2, 8, mid_kinds, 3 if mode != "quick" else 1, 3),
        Scenario(1_048_576, 8, 4, 2, 8, big_kinds, 1, 3 if mode != "quick" else 1),
    ]


# -- timing ----------------------------------------------------------------------


def median_time(fn: Callable[[], object], repeats: int, number: int = 1) -> float:
    """Median over ``repeats`` of the mean time of ``number`` back-to-back calls.

    Garbage collection is paused while timing, as ``timeit`` does (a full
    collection walks every object torch and megatron-core allocated).
    """
    samples = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - start) / number)
    finally:
        gc.enable()
    return statistics.median(samples)


def fmt(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def ratio(theirs: Optional[float], ours: Optional[float]) -> str:
    if theirs is None or ours is None:
        return "-"
    return f"{theirs / ours:,.0f}x" if theirs / ours >= 10 else f"{theirs / ours:.1f}x"


# -- one scenario -------------------------------------------------------------------


@dataclass
class Row:
    kind: str
    group_size: int
    ours_cold: float
    ours_warm: float
    ours_groups: float
    megatron_find: Optional[float] = None
    megatron_get_ranks: Optional[float] = None


def megatron_generators(scenario: Scenario, rank_generator):
    dp = scenario.world // (scenario.tp * scenario.pp * scenario.cp)
    edp = scenario.world // (scenario.tp * scenario.ep * scenario.pp)
    return {
        "dense": lambda: rank_generator(
            tp=scenario.tp, ep=1, dp=dp, pp=scenario.pp, cp=scenario.cp, order=ORDER
        ),
        "expert": lambda: rank_generator(
            tp=scenario.tp, ep=scenario.ep, dp=edp, pp=scenario.pp, cp=1, order=ORDER
        ),
    }


def clear_geometry_cache() -> None:
    """Forget cached group geometries so that plan() + group_of() runs from scratch."""
    cache_clear = getattr(getattr(layout_module, "_geometry", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def run_scenario(scenario: Scenario, rank_generator) -> Tuple[float, List[Row]]:
    rank = scenario.probe_rank
    layout = scenario.plan()

    def cold_plan() -> None:
        clear_geometry_cache()
        scenario.plan()

    gc.collect()
    plan_time = median_time(cold_plan, repeats=5, number=100)
    generators = megatron_generators(scenario, rank_generator) if rank_generator else {}
    rows = []
    for kind in ALL_KINDS:

        def cold_group_of(kind: str = kind) -> List[int]:
            clear_geometry_cache()
            return scenario.plan().group_of(kind, rank)

        ours_cold = median_time(cold_group_of, repeats=5, number=20)
        ours_warm = median_time(lambda kind=kind: layout.group_of(kind, rank), repeats=5, number=100)
        ours_groups = median_time(
            lambda kind=kind: layout.groups(kind), repeats=scenario.our_enumeration_repeats
        )
        row = Row(kind, layout.size(kind), ours_cold, ours_warm, ours_groups)

        if rank_generator and kind in scenario.megatron_kinds:
            grid, token = MEGATRON_TOKEN[kind]
            finds, enumerations = [], []
            for _ in range(scenario.megatron_repeats):
                gc.disable()
                try:
                    start = time.perf_counter()
                    generator = generators[grid]()
                    listed_at = time.perf_counter()
                    groups = generator.get_ranks(token)
                    enumerated_at = time.perf_counter()
                    found = next(group for group in groups if rank in group)
                    found_at = time.perf_counter()
                finally:
                    gc.enable()
                finds.append(found_at - start)
                enumerations.append(enumerated_at - listed_at)
            if found != layout.group_of(kind, rank):
                raise SystemExit(f"{scenario.label} {kind}: group_of differs from megatron-core")
            if scenario.world <= 131_072 and groups != layout.groups(kind):
                raise SystemExit(f"{scenario.label} {kind}: groups() differ from megatron-core")
            del groups
            row.megatron_find = statistics.median(finds)
            row.megatron_get_ranks = statistics.median(enumerations)
        rows.append(row)
    return plan_time, rows


# -- report -----------------------------------------------------------------------------


def print_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> None:
    """Left-align the first column, right-align the others."""
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        )

    header = line(headers)
    print(header)
    print("-" * len(header))
    for row in body:
        print(line(row))


def report(scenario: Scenario, plan_time: float, rows: List[Row]) -> None:
    print(f"\n== {scenario.label}, order {ORDER}; probe rank {scenario.probe_rank:,} ==")
    print(f"plan() alone, cold: {fmt(plan_time)}")
    headers = (
        "kind", "size",
        "ours plan+group_of", "ours group_of warm", "megatron gen+get_ranks+find", "ratio",
        "ours groups()", "megatron get_ranks", "ratio",
    )
    body = [
        (
            r.kind,
            f"{r.group_size:,}",
            fmt(r.ours_cold),
            fmt(r.ours_warm),
            fmt(r.megatron_find),
            ratio(r.megatron_find, r.ours_cold),
            fmt(r.ours_groups),
            fmt(r.megatron_get_ranks),
            ratio(r.megatron_get_ranks, r.ours_groups),
        )
        for r in rows
    ]
    print_table(headers, body)
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--quick", action="store_true", help="fewer repeats and megatron kinds")
    modes.add_argument("--full", action="store_true", help="every kind against megatron-core at 1M")
    parser.add_argument("--no-megatron", action="store_true", help="time mpu-bridge only")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"

    rank_generator = None
    if not args.no_megatron:
        warnings.filterwarnings("ignore")
        try:
            from megatron.core.parallel_state import RankGenerator as rank_generator
        except ImportError:
            print("megatron-core is not installed: timing mpu-bridge only", file=sys.stderr)
    print(
        f"python {sys.version.split()[0]}; ratio = megatron-core time / mpu-bridge time "
        f"(higher is better for mpu-bridge); mode {mode}"
    )
    started = time.perf_counter()
    for scenario in scenarios(mode):
        plan_time, rows = run_scenario(scenario, rank_generator)
        report(scenario, plan_time, rows)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
