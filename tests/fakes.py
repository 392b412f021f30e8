"""Test doubles generated from the recorded MPU surfaces in ``compat/surfaces/*.json``.

``fake_mpu_from_surface(record, layout, rank, groups=None)`` builds an MPU that has
exactly the names its record lists (a module named like the real one, or an object),
each with the recorded parameters, answering from a :class:`mpu_bridge.layout.Layout`
as the real MPU would for ``rank``:

* ``world_size`` / ``rank`` / ``ranks`` answers come from the layout (no processes);
* ``group`` answers come from ``groups`` (layout kind -> this rank's process group),
  supplied by the test; without groups they raise ``RuntimeError``;
* with ``layout=None`` the fake is *uninitialised* and does what the record says the
  real getter does before initialisation (return 0/None, or raise AssertionError);
* an answer recorded with ``requires`` (e.g. Megatron-DeepSpeed's legacy
  ``get_model_parallel_world_size`` needs pp = 1) raises AssertionError otherwise;
* names recorded without answers raise ``NotImplementedError`` when called (the
  reader must not need them); so does a keyword combination the record has no answer for.

Nothing here is written per flavour: everything comes from the record.
"""

from __future__ import annotations

import inspect
import json
import types
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

from mpu_bridge.layout import Layout
from mpu_bridge.mpu import DIMENSION_KINDS

SURFACES_DIR = Path(__file__).resolve().parent.parent / "compat" / "surfaces"

#: keyword arguments that change nothing about which group is answered
_NEUTRAL_KWARGS = {"check_initialized"}


def surface_names() -> List[str]:
    """File stems of every recorded surface, sorted."""
    return sorted(path.stem for path in SURFACES_DIR.glob("*.json"))


def load_surface(name: str) -> Dict[str, Any]:
    """The record ``compat/surfaces/<name>.json``."""
    with open(SURFACES_DIR / f"{name}.json") as handle:
        return json.load(handle)


def _parse_params(params: List[str]) -> inspect.Signature:
    parameters = []
    for text in params:
        if text.startswith("**"):
            parameters.append(inspect.Parameter(text[2:], inspect.Parameter.VAR_KEYWORD))
        elif text.startswith("*"):
            parameters.append(inspect.Parameter(text[1:], inspect.Parameter.VAR_POSITIONAL))
        elif "=" in text:
            name, default = text.split("=", 1)
            parameters.append(
                inspect.Parameter(
                    name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=_literal(default)
                )
            )
        else:
            parameters.append(inspect.Parameter(text, inspect.Parameter.POSITIONAL_OR_KEYWORD))
    return inspect.Signature(parameters)


def _literal(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _effective_order(order: str, sizes: Mapping[str, int]) -> List[str]:
    """The order's tokens whose size is > 1 (what decides the rank layout)."""
    return [token for token in order.split("-") if sizes.get(token, 1) > 1]


def check_layout_constraints(record: Mapping[str, Any], layout: Layout) -> None:
    """Raise ValueError when the record's MPU cannot produce ``layout``."""
    config = layout.config
    sizes = {"tp": config.tp, "pp": config.pp, "cp": config.cp, "ep": config.ep, "dp": config.dp}
    name = f"{record['flavour']} {record['release']}"
    for key, value in record.get("layout_constraints", {}).items():
        if key in ("tp", "pp", "cp", "ep") and sizes[key] != value:
            raise ValueError(f"{name} cannot build a layout with {key} = {sizes[key]} (only {value})")
        if key == "etp_equals_tp" and value and config.etp != config.tp:
            raise ValueError(f"{name} has no expert-tensor parallelism (etp must equal tp)")
        if key == "no_cp_with_ep" and value and config.cp > 1 and config.ep > 1:
            raise ValueError(f"{name}: cp > 1 with ep > 1 is not modelled (different expert layout)")
        if key == "sequence_parallel_needs_tp_pp_1" and value and config.cp > 1:
            if config.tp > 1 or config.pp > 1:
                raise ValueError(f"{name}: sequence parallelism needs tp = pp = 1")
        if key == "order":
            want = _effective_order(value, sizes)
            have = _effective_order(config.order, sizes)
            if want != have:
                raise ValueError(f"{name} lays ranks out as {value!r}, not {config.order!r}")


class _Topology:
    def __init__(self, axes: List[str]) -> None:
        self._axes = list(axes)

    def get_axis_names(self) -> List[str]:
        return list(self._axes)


def _make_getter(
    name: str,
    entry: Mapping[str, Any],
    layout: Optional[Layout],
    rank: int,
    groups: Optional[Mapping[str, Any]],
) -> Callable[..., Any]:
    signature = _parse_params(entry.get("params", []))
    answers = entry.get("answers", [])
    before = entry.get("before_init")

    def getter(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)  # TypeError like the real function
        asked = {
            key: value
            for key, value in bound.arguments.items()
            if key not in _NEUTRAL_KWARGS
            and signature.parameters[key].default is not inspect.Parameter.empty
            and value != signature.parameters[key].default
        }
        if not answers:
            raise NotImplementedError(f"fake MPU: {name} is recorded but not modelled")
        matching = [a for a in answers if dict(a.get("kwargs", {})) == asked]
        if not matching:
            raise NotImplementedError(f"fake MPU: no recorded answer for {name}(**{asked})")
        if layout is None:
            if before is None or "raises" in before:
                message = (before or {}).get("message") or f"{name}: group is not initialized"
                raise AssertionError(message)
            return before.get("returns")
        answer = matching[0]
        for key, value in answer.get("requires", {}).items():
            actual = getattr(layout.config, key)
            if actual != value:
                raise AssertionError(
                    f"fake MPU: {name} is only valid when {key} = {value} (here {actual})"
                )
        query = answer["query"]
        if answer["dim"] == "world":
            return rank
        kind = DIMENSION_KINDS[answer["dim"]]
        if query == "world_size":
            return layout.size(kind)
        if query == "rank":
            return layout.rank_in_group(kind, rank)
        if query == "ranks":
            return layout.group_of(kind, rank)
        if query == "group":
            if groups is None:
                raise RuntimeError(f"fake MPU built without process groups: {name} cannot answer")
            if kind not in groups:
                raise RuntimeError(f"fake MPU: no {kind} group supplied for {name}")
            return groups[kind]
        raise NotImplementedError(f"fake MPU: query {query!r} of {name}")

    getter.__name__ = name
    getter.__qualname__ = name
    getter.__signature__ = signature  # type: ignore[attr-defined]
    return getter


def fake_mpu_from_surface(
    record: Mapping[str, Any],
    layout: Optional[Layout] = None,
    rank: int = 0,
    groups: Optional[Mapping[str, Any]] = None,
) -> Any:
    """An MPU with exactly ``record``'s names, answering from ``layout`` for ``rank``.

    ``layout=None`` gives an uninitialised MPU. ``groups`` maps layout kinds (``"tp"``,
    ``"dp-cp"``, ...) to this rank's process groups.

    Example::

        >>> fake = fake_mpu_from_surface(load_surface("megatron-lm-1.0"), plan(8, tp=2), rank=3)
        >>> fake.get_model_parallel_world_size(), fake.get_data_parallel_rank()
        (2, 1)
    """
    if layout is not None:
        check_layout_constraints(record, layout)
        if not 0 <= rank < layout.world_size:
            raise ValueError(f"rank {rank} outside the world of {layout.world_size}")
    getters = {
        name: _make_getter(name, entry, layout, rank, groups)
        for name, entry in record["names"].items()
    }
    if "topology_axes" in record:
        axes = record["topology_axes"]
        getters["topology"] = lambda: _Topology(axes)
    label = f"{record['flavour']} {record['release']}"
    if record.get("kind") == "module":
        fake: Any = types.ModuleType(record.get("module", "fake_mpu"), f"fake MPU ({label})")
    else:
        cls_name = str(record.get("class", "FakeMpu")).rsplit(".", 1)[-1]
        fake = type(cls_name, (), {"__repr__": lambda self: f"<fake {cls_name} ({label})>"})()
    for name, func in getters.items():
        setattr(fake, name, func)
    return fake
