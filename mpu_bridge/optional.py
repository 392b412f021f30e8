"""Optional dependencies: find out early that one is missing, and say how to install it.

megatron-core and DeepSpeed are extras of mpu-bridge (``pip install
'mpu-bridge[megatron]'``, ``'mpu-bridge[deepspeed]'``); torch is a dependency, but a
planner-only install (``pip install --no-deps mpu-bridge``) runs without it. A
command that needs one of them calls :func:`require` before it starts any process,
so the user gets one line instead of a traceback per rank. No torch here.

Example (where megatron-core is missing)::

    require("megatron.core", package="megatron-core", extra="megatron")
    # MissingDependencyError: megatron-core is not installed (cannot import megatron.core);
    #                         install it with: pip install 'mpu-bridge[megatron]'
"""

from __future__ import annotations

import importlib.util
import re
import sys
import warnings
from importlib import metadata
from typing import Optional

from .errors import BridgeError

__all__ = ["MissingDependencyError", "install_hint", "is_available", "quiet_missing_numpy", "require"]


class MissingDependencyError(BridgeError, ImportError):
    """An optional dependency a command or function needs is not installed.

    A :class:`~mpu_bridge.errors.BridgeError` (``mpu-bridge`` prints it as one
    ``mpu-bridge: error: ...`` line, exit status 2) and an :class:`ImportError`.
    """


def is_available(module: str) -> bool:
    """Whether ``module`` can be found, without importing it (its parent packages are imported).

    Example: ``is_available("json")`` -> True; ``is_available("no_such_module")`` -> False.
    """
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        return False


def _declared_requirement(package: str) -> str:
    """mpu-bridge's own requirement on ``package`` (e.g. ``torch>=2.6``), else ``package``."""
    try:
        declared = metadata.requires("mpu-bridge") or []
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return package
    for requirement in declared:
        if ";" in requirement:  # an extra's requirement
            continue
        name = re.split(r"[\s<>=!~\[(]", requirement, maxsplit=1)[0]
        if name.lower().replace("_", "-") == package.lower():
            return requirement.replace(" ", "")
    return package


def install_hint(package: str, extra: Optional[str] = None) -> str:
    """The pip command that installs ``package``: through mpu-bridge's ``extra`` when it has
    one, else with the version range mpu-bridge declares for it.

    Example: ``install_hint("megatron-core", "megatron")`` -> ``"pip install 'mpu-bridge[megatron]'"``;
    ``install_hint("torch")`` -> ``"pip install 'torch>=2.6'"`` (from the installed metadata).
    """
    return f"pip install 'mpu-bridge[{extra}]'" if extra else f"pip install '{_declared_requirement(package)}'"


def require(module: str, *, package: str, extra: Optional[str] = None, needed_for: str = "") -> None:
    """Raise :class:`MissingDependencyError` unless ``module`` can be imported.

    ``package`` is the distribution that provides ``module``; ``extra`` the
    mpu-bridge extra that installs it; ``needed_for`` what needs it (for the message).
    Cheap: the module is found, not imported.

    Example: ``require("megatron.core", package="megatron-core", extra="megatron",
    needed_for="--with-megatron")`` raises, where megatron-core is missing,
    ``MissingDependencyError("--with-megatron needs megatron-core, which is not installed
    (cannot import megatron.core); install it with: pip install 'mpu-bridge[megatron]'")``.
    """
    if is_available(module):
        return
    what = f"{needed_for} needs {package}, which is not installed" if needed_for else f"{package} is not installed"
    raise MissingDependencyError(f"{what} (cannot import {module}); install it with: {install_hint(package, extra)}")


#: torch's import-time warning where numpy is absent, as a ``-W`` option (message prefix).
_NUMPY_WARNING = "ignore:Failed to initialize NumPy:UserWarning"


def quiet_missing_numpy() -> None:
    """Silence torch's ``Failed to initialize NumPy`` warning here and in later multiprocessing children.

    torch warns on every import when numpy is absent. numpy is an optional
    dependency of torch that mpu-bridge never uses (no tensor goes to or comes from
    numpy), so the self-check ignores that one message instead of depending on numpy.
    Call it before torch is imported. It adds one warnings filter to this process and
    the same ``-W`` option to ``sys.warnoptions``, which :mod:`multiprocessing` passes
    to the interpreters it starts (the fork server, ``spawn`` children); nothing else.
    """
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    if _NUMPY_WARNING not in sys.warnoptions:
        sys.warnoptions.append(_NUMPY_WARNING)
