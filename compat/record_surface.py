#!/usr/bin/env python
"""Record the MPU surface of an installed package as JSON (see compat/README.md).

Usage::

    python compat/record_surface.py                      # megatron-core -> stdout
    python compat/record_surface.py --output compat/surfaces/megatron-core-0.16.1.json
    python compat/record_surface.py --flavour deepspeed-pipe-grid --output ...
    python compat/record_surface.py --flavour deepspeed-ulysses --output ...

What is recorded, per relevant name (a getter of a parallel dimension: its name
contains ``parallel``, ``rank`` or ``group``): its parameters (from
``inspect.signature``), what it answers in mpu-bridge's terms (dimension + query,
from the meaning table below, for the names mpu-bridge knows) and, for functions
of a module that need no arguments, what it does before initialisation (called
here, in a process where ``torch.distributed`` is not initialised: the value it
returns or the exception it raises).

The flavour ``device-mesh`` (a ``DeviceMesh`` read through ``mpu_bridge.mesh.MeshMpu``)
has no recorder and no record: its names follow the mesh, not a release (see
compat/README.md, "Flavours without a record").

The meaning table says what a name *means*; the record says which names a release
*has*. Only names the installed release has are written, and a keyword variant
(e.g. ``with_context_parallel=True``) only when the signature has that keyword.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import os
import re
import sys
import warnings
from typing import Any, Dict, List, Optional, Tuple

RELEVANT = re.compile(r"^get_.*(parallel|rank|group|remat)")

_WITH_CP = {"with_context_parallel": True}


def _answers(*entries: Tuple[str, str, Optional[Dict[str, Any]], Optional[Dict[str, int]]]):
    return [
        {k: v for k, v in (("dim", d), ("query", q), ("kwargs", kw), ("requires", req)) if v}
        for d, q, kw, req in entries
    ]


def _trio(prefix: str, dim: str, **extra: Any) -> Dict[str, List[Dict[str, Any]]]:
    kwargs = extra.get("kwargs")
    requires = extra.get("requires")
    return {
        f"{prefix}_world_size": _answers((dim, "world_size", kwargs, requires)),
        f"{prefix}_rank": _answers((dim, "rank", kwargs, requires)),
        f"{prefix}_group": _answers((dim, "group", kwargs, requires)),
    }


def _with_cp_variant(table: Dict[str, List[Dict[str, Any]]], prefix: str, dim: str) -> None:
    for query in ("world_size", "rank", "group"):
        table[f"{prefix}_{query}"] += _answers((dim, query, _WITH_CP, None))


def megatron_core_meanings() -> Dict[str, List[Dict[str, Any]]]:
    """What megatron-core's parallel_state names answer (all releases 0.4 ... 0.18; 0.19's
    GTP changes are applied by :func:`megatron_core_meanings_for`)."""
    table: Dict[str, List[Dict[str, Any]]] = {}
    table.update(_trio("get_tensor_model_parallel", "tp"))
    table.update(_trio("get_pipeline_model_parallel", "pp"))
    table.update(_trio("get_data_parallel", "dp"))
    _with_cp_variant(table, "get_data_parallel", "sdp")
    table.update(_trio("get_context_parallel", "cp"))
    table["get_context_parallel_global_ranks"] = _answers(("cp", "ranks", None, None))
    table["get_model_parallel_group"] = _answers(
        ("mp", "group", None, None),
        # 0.6-0.9: the model-parallel group of the expert layout (expert tensor = tensor)
        ("etp-ep-pp", "group", {"with_expert_parallel": True}, None),
    )
    table.update(_trio("get_expert_model_parallel", "ep"))
    table.update(_trio("get_expert_tensor_parallel", "etp"))
    table.update(_trio("get_expert_data_parallel", "edp"))
    # 0.4-0.9 name of the expert-data group; a deprecated alias of the above since 0.10.
    table.update(_trio("get_data_modulo_expert_parallel", "edp", requires={"cp": 1}))
    # 0.7-0.9: with_context_parallel=True gives the expert-data group that includes cp.
    _with_cp_variant(table, "get_data_modulo_expert_parallel", "edp")
    table.update(_trio("get_tensor_and_context_parallel", "tp-cp"))
    table.update(_trio("get_tensor_and_data_parallel", "tp-dp"))
    _with_cp_variant(table, "get_tensor_and_data_parallel", "tp-dp-cp")
    table.update(_trio("get_expert_tensor_and_model_parallel", "etp-ep"))
    table.update(_trio("get_tensor_and_expert_parallel", "etp-ep"))
    table["get_expert_tensor_model_pipeline_parallel_group"] = _answers(("etp-ep-pp", "group", None, None))
    return table


def megatron_core_meanings_for(module: Any) -> Dict[str, List[Dict[str, Any]]]:
    table = megatron_core_meanings()
    # Since 0.10 get_data_modulo_expert_parallel_* is an alias of get_expert_data_parallel_*
    # (context parallelism included), so the cp == 1 restriction of 0.4-0.9 does not apply.
    if hasattr(module, "get_expert_data_parallel_group"):
        for query in ("world_size", "rank", "group"):
            for answer in table[f"get_data_modulo_expert_parallel_{query}"]:
                answer.pop("requires", None)
    if "with_gtp_remat" in _params_names(getattr(module, "get_data_parallel_group", None)):
        _gtp_meanings(table)
    return table


def _params_names(func: Any) -> List[str]:
    try:
        return list(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return []


def _gtp_meanings(table: Dict[str, List[Dict[str, Any]]]) -> None:
    """megatron-core 0.19 (Generalized Tensor Parallelism): the data-parallel getters answer
    the data-*distribution* groups by default (with_gtp_remat=True, spanning gtp_remat);
    with_gtp_remat=False gives the replicate groups (dp, sdp, edp)."""
    replicate = {"with_gtp_remat": False}
    for query in ("world_size", "rank", "group"):
        table[f"get_data_parallel_{query}"] = _answers(
            ("gtp-dp", query, None, None),
            ("dp", query, replicate, None),
            ("gtp-dp-cp", query, _WITH_CP, None),
            ("sdp", query, {**_WITH_CP, **replicate}, None),
        )
        table[f"get_expert_data_parallel_{query}"] = _answers(
            ("egtp-edp", query, None, None), ("edp", query, replicate, None)
        )
    table.update(_trio("get_gtp_weight_remat", "gtp"))
    table["get_gtp_weight_remat_global_ranks"] = _answers(("gtp", "ranks", None, None))
    table.update(_trio("get_expert_gtp_weight_remat", "egtp"))
    table["get_expert_gtp_weight_remat_global_ranks"] = _answers(("egtp", "ranks", None, None))
    table["get_expert_tensor_model_pipeline_parallel_group"] = _answers(
        ("etp-ep-pp", "group", None, None), ("etp-ep-egtp-pp", "group", {"with_egtp_remat": True}, None)
    )


def deepspeed_grid_meanings() -> Dict[str, List[Dict[str, Any]]]:
    """What DeepSpeed's PipelineParallelGrid methods answer."""
    table: Dict[str, List[Dict[str, Any]]] = {}
    table.update(_trio("get_slice_parallel", "tp"))
    table["get_tensor_model_parallel_world_size"] = _answers(("tp", "world_size", None, None))
    table["get_tensor_model_parallel_rank"] = _answers(("tp", "rank", None, None))
    table.update(_trio("get_pipe_parallel", "pp"))
    table["get_pipeline_model_parallel_world_size"] = _answers(("pp", "world_size", None, None))
    table["get_pipeline_model_parallel_rank"] = _answers(("pp", "rank", None, None))
    table.update(_trio("get_data_parallel", "dp"))
    table["get_data_parallel_group_ranks"] = _answers(("dp", "ranks", None, None))
    table.update(_trio("get_model_parallel", "mp"))
    table["get_global_rank"] = _answers(("world", "global_rank", None, None))
    return table


def deepspeed_ulysses_meanings() -> Dict[str, List[Dict[str, Any]]]:
    """What DeepSpeed's slim Ulysses MPU (parallel_state_sp) answers."""
    table: Dict[str, List[Dict[str, Any]]] = {}
    table.update(_trio("get_sequence_parallel", "cp"))
    table.update(_trio("get_sequence_data_parallel", "sdp"))
    # get_model_parallel_* are aliases of the sequence-parallel getters there.
    table.update(_trio("get_model_parallel", "cp"))
    table["initialize_sequence_parallel"] = []
    return table


def _params(func: Any) -> List[str]:
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):
        return []
    out = []
    for name, param in signature.parameters.items():
        if name == "self":
            continue
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            out.append(f"*{name}")
        elif param.kind is inspect.Parameter.VAR_KEYWORD:
            out.append(f"**{name}")
        elif param.default is inspect.Parameter.empty:
            out.append(name)
        else:
            out.append(f"{name}={param.default!r}")
    return out


def _before_init(func: Any) -> Optional[Dict[str, Any]]:
    """Call a no-argument getter and record what it does (value or exception type)."""
    try:
        required = [
            p
            for p in inspect.signature(func).parameters.values()
            if p.default is inspect.Parameter.empty
            and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return None
    if required:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = func()
    except Exception as exc:  # the point is to record it
        return {"raises": type(exc).__name__, "message": str(exc)[:200]}
    if value is None or isinstance(value, (bool, int, str)):
        return {"returns": value}
    if isinstance(value, (list, dict, tuple)) and not value:
        return {"returns": type(value)()}
    return {"returns_type": type(value).__name__}


def _entries(
    names: List[str],
    lookup: Any,
    meanings: Dict[str, List[Dict[str, Any]]],
    call_before_init: bool,
) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    for name in sorted(names):
        func = lookup(name)
        params = _params(func)
        param_names = {p.split("=")[0].lstrip("*") for p in params}
        entry: Dict[str, Any] = {"params": params}
        answers = []
        for answer in meanings.get(name, []):
            if set(answer.get("kwargs", {})) <= param_names:
                answers.append(answer)
        entry["answers"] = answers
        if call_before_init and name.startswith("get_"):
            behaviour = _before_init(func)
            if behaviour is not None:
                entry["before_init"] = behaviour
        out[name] = entry
    return out


def record_megatron_core() -> Dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = importlib.import_module("megatron.core.parallel_state")
        version = importlib.import_module("megatron.core.package_info").__version__
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        raise SystemExit("record in a fresh process: torch.distributed must not be initialised")
    names = [
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and not name.startswith("_")
        and RELEVANT.match(name)
    ]
    init_params = _params(module.initialize_model_parallel)
    return {
        "flavour": "megatron-core",
        "release": version,
        "kind": "module",
        "module": module.__name__,
        "source": {
            "how": "recorded from the installed package by compat/record_surface.py",
            "package": f"megatron-core=={version}",
            "date": datetime.date.today().isoformat(),
        },
        "initialize": {"name": "initialize_model_parallel", "params": init_params},
        "layout_constraints": {},
        "before_init_context": "torch.distributed not initialised",
        "names": _entries(names, lambda n: getattr(module, n), megatron_core_meanings_for(module), True),
    }


def _deepspeed_version() -> str:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import deepspeed

    return str(deepspeed.__version__)


def record_deepspeed_grid() -> Dict[str, Any]:
    version = _deepspeed_version()
    from deepspeed.runtime.pipe import topology

    cls = topology.PipelineParallelGrid
    names = [
        name
        for name, value in vars(cls).items()
        if inspect.isfunction(value) and not name.startswith("_") and RELEVANT.match(name)
    ]
    return {
        "flavour": "deepspeed-pipe-grid",
        "release": version,
        "kind": "object",
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "topology_axes": list(topology.PipeModelDataParallelTopology(1, 1, 1).get_axis_names()),
        "source": {
            "how": "recorded from the installed package by compat/record_surface.py",
            "package": f"deepspeed=={version}",
            "date": datetime.date.today().isoformat(),
        },
        "initialize": {"name": "PipelineParallelGrid", "params": _params(cls.__init__)},
        # PipeModelDataParallelTopology: model (tensor slicing) fastest, then data, then pipe.
        "layout_constraints": {"cp": 1, "ep": 1, "order": "tp-dp-pp"},
        "names": _entries(names, lambda n: getattr(cls, n), deepspeed_grid_meanings(), False),
    }


def record_deepspeed_ulysses() -> Dict[str, Any]:
    version = _deepspeed_version()
    module = importlib.import_module("deepspeed.runtime.sequence_parallel.parallel_state_sp")
    names = [
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and not name.startswith("_")
        and (RELEVANT.match(name) or name in deepspeed_ulysses_meanings())
    ]
    return {
        "flavour": "deepspeed-ulysses",
        "release": version,
        "kind": "module",
        "module": module.__name__,
        "source": {
            "how": "recorded from the installed package by compat/record_surface.py",
            "package": f"deepspeed=={version}",
            "date": datetime.date.today().isoformat(),
        },
        "initialize": {
            "name": "initialize_sequence_parallel",
            "params": _params(module.initialize_sequence_parallel),
        },
        # sequence groups are contiguous blocks, the sequence-data group is the whole world.
        "layout_constraints": {"tp": 1, "pp": 1, "ep": 1},
        "names": _entries(names, lambda n: getattr(module, n), deepspeed_ulysses_meanings(), False),
    }


RECORDERS = {
    "megatron-core": record_megatron_core,
    "deepspeed-pipe-grid": record_deepspeed_grid,
    "deepspeed-ulysses": record_deepspeed_ulysses,
}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavour", choices=sorted(RECORDERS), default="megatron-core")
    parser.add_argument("--output", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    record = RECORDERS[args.flavour]()
    text = json.dumps(record, indent=2, sort_keys=False) + "\n"
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            handle.write(text)
        print(f"wrote {args.output}: {len(record['names'])} names", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
