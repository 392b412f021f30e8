"""Multi-module layouts as rank spans: ``--module NAME:tp=2,pp=2,ranks=4``, repeated.

``mpu-bridge plan`` and ``mpu-bridge selfcheck`` read the same specs. Each module is a
rank span of its own, in the order given: it starts at ``offset=N`` when given (so
modules may share ranks: colocated), else where the previous one ended (the first at
rank 0); a module without ``ranks`` takes the rest of the world (only the last may omit
it). A module's sizes are ``tp``, ``pp``, ``cp``, ``ep`` and ``etp`` (default 1; ``etp``
defaults to ``tp``); ``ranks`` and ``offset`` are megatron-core's ``local_world_size``
and ``rank_offset``. Pure: no torch.

Example::

    >>> [(m.name, offset, size) for m, offset, size in spans(parse_modules(["encoder:ranks=2", "llm:tp=2"]), 6)]
    [('encoder', 0, 2), ('llm', 2, 4)]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

from .errors import LayoutError
from .layout import DEFAULT_ORDER, Layout, plan

__all__ = ["MODULE_KEYS", "ModuleSpec", "module_layouts", "parse_module", "parse_modules", "spans"]

#: The keys a ``--module`` spec takes: its sizes, ``ranks`` (its span's length) and ``offset``
#: (its first rank).
MODULE_KEYS: Tuple[str, ...] = ("tp", "pp", "cp", "ep", "etp", "ranks", "offset")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModuleSpec:
    """One module of a multi-module layout: its name, sizes (``(key, value)`` pairs of
    :data:`MODULE_KEYS` other than ``ranks`` and ``offset``), span length (None: the rest of
    the world) and first rank (None: where the previous module ended)."""

    name: str
    sizes: Tuple[Tuple[str, int], ...] = ()
    ranks: Optional[int] = None
    offset: Optional[int] = None

    def size(self, key: str, default: Optional[int] = 1) -> Optional[int]:
        """The module's ``key`` size (``default`` when not given)."""
        return dict(self.sizes).get(key, default)


def parse_module(text: str) -> ModuleSpec:
    """``NAME[:key=N,key=N,...]`` as a :class:`ModuleSpec`; LayoutError saying what is wrong.

    Example: ``parse_module("llm:tp=2,ranks=4") == ModuleSpec("llm", (("tp", 2),), 4)``.
    """
    name, _, rest = str(text).partition(":")
    if not _NAME.match(name):
        raise LayoutError(f"--module {text!r}: a module needs a name (letters, digits, _ . -), e.g. llm:tp=2,pp=2")
    values: Dict[str, int] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if key not in MODULE_KEYS or not eq:
            raise LayoutError(f"--module {text!r}: {item!r} is not KEY=N with KEY one of {', '.join(MODULE_KEYS)}")
        if key in values:
            raise LayoutError(f"--module {text!r}: {key} is given twice")
        if not value.isdigit() or int(value) < (0 if key == "offset" else 1):
            what = "an integer >= 0" if key == "offset" else "a positive integer"
            raise LayoutError(f"--module {text!r}: {key} must be {what}, got {value!r}")
        values[key] = int(value)
    ranks, offset = values.pop("ranks", None), values.pop("offset", None)
    return ModuleSpec(name, tuple((k, values[k]) for k in MODULE_KEYS if k in values), ranks, offset)


def parse_modules(texts: Sequence[str]) -> Tuple[ModuleSpec, ...]:
    """Every ``--module`` spec, names checked distinct."""
    modules = tuple(parse_module(text) for text in texts)
    names = [m.name for m in modules]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LayoutError(f"--module names must differ; {', '.join(repeated)} is given more than once")
    return modules


def spans(
    modules: Sequence[ModuleSpec], world_size: int, *, tile: bool = True
) -> Tuple[Tuple[ModuleSpec, int, int], ...]:
    """``(module, rank_offset, ranks)`` of each module inside the world; with ``tile``, the
    spans must also follow each other from rank 0 and cover the world exactly (each rank
    runs one module: what the self-check proves). LayoutError naming the numbers otherwise.

    Example: ``spans((ModuleSpec("a", ranks=2), ModuleSpec("b")), 6)[1][1:] == (2, 4)``.
    """
    if not modules:
        raise LayoutError("a multi-module layout needs at least one --module")
    open_ended = [m.name for m in modules[:-1] if m.ranks is None]
    if open_ended:
        raise LayoutError(f"--module {open_ended[0]} needs ranks=N: only the last module may take the rest")
    out = []
    offset = 0
    for module in modules:
        if module.offset is not None:
            if tile and module.offset != offset:
                raise LayoutError(f"--module {module.name}: offset={module.offset}, but here each module starts "
                                  f"where the previous one ended (rank {offset}): leave offset out")
            offset = module.offset
        size = module.ranks if module.ranks is not None else world_size - offset
        if size < 1 or offset + size > world_size:
            raise LayoutError(
                f"the modules' spans need {offset + max(size, 1)} ranks or more, but the world has {world_size}: "
                f"module {module.name} would span ranks {offset}..{offset + size - 1}"
            )
        out.append((module, offset, size))
        offset += size
    if tile and offset != world_size:
        raise LayoutError(
            f"the modules' spans cover ranks 0..{offset - 1} of a world of {world_size}: every rank must run "
            "a module (give the last one no ranks= to take the rest)"
        )
    return tuple(out)


def module_layouts(
    modules: Sequence[ModuleSpec], world_size: int, *, order: str = DEFAULT_ORDER,
    gpus_per_node: Optional[int] = None, tile: bool = False,
) -> Tuple[Tuple[str, Layout], ...]:
    """``(name, layout)`` of each module: its sizes over its span (``rank_offset``).

    Example: ``module_layouts(parse_modules(["a:ranks=2", "b:tp=2"]), 6)[1][1].groups("tp")
    == [[2, 3], [4, 5]]``.
    """
    return tuple(
        (spec.name, plan(size, tp=spec.size("tp") or 1, pp=spec.size("pp") or 1, cp=spec.size("cp") or 1,
                         ep=spec.size("ep") or 1, etp=spec.size("etp", None), order=order,
                         gpus_per_node=gpus_per_node, rank_offset=offset))
        for spec, offset, size in spans(modules, world_size, tile=tile)
    )
