"""What runs on one rank of the self-check: initialise, attach, probe, tear down.

:func:`check_rank` runs every phase (``torch.distributed``, megatron-core with
``--with-megatron``, :func:`~mpu_bridge.bridge.attach`, group creation,
collectives, teardown), timing each, and returns a
:class:`~mpu_bridge.selfcheck.results.RankResult`; it never raises.
:func:`spawned_rank` is the entry point of a rank the local launcher started.
Each rank writes the phase it enters to the store, so a rank killed at the
timeout can be reported with where it was (:func:`last_phase`).
torch is imported only inside the functions.

Example (one rank under torchrun, the default store from ``init_process_group``)::

    result, store = check_rank(config, rank, world_size, local_rank, local_world_size, None)
"""

from __future__ import annotations

import datetime
import faulthandler
import functools
import logging
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import BridgeError, LayoutError, OutsideSpanError
from ..kinds import KIND_BY_METHOD
from ..layout import DEFAULT_ORDER
from .config import DENSE_METHODS, SelfCheckConfig, expected_exports, expected_groups, module_configs
from .probe import create_exports, create_groups, export_fields, run_collectives
from .results import OUTSIDE, GroupCheck, RankResult

__all__ = [
    "check_rank",
    "destroy_default_group",
    "fault_hook",
    "last_phase",
    "resolve_backend",
    "setup_rank_process",
    "spawned_rank",
]

logger = logging.getLogger(__name__)

_PHASE_KEY = "mpu_bridge/selfcheck/phase"
_FAULT_EXIT_STATUS = 3


class _WarningCollector(logging.Handler):
    """Keeps the library's warnings for the report (one line there, not one per rank on stderr)."""

    def __init__(self, into: List[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.into:
            self.into.append(message)


class _Phases:
    """Times named phases into a dict; remembers the phase running when an error struck.

    ``announce(name)``, when set, is told each phase as it starts (the rank's progress
    in the store).
    """

    def __init__(self, into: Dict[str, float], announce: Optional[Callable[[str], None]] = None) -> None:
        self.into = into
        self.current: Optional[str] = None
        self.announce = announce

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        self.current = name
        if self.announce is not None:
            self.announce(name)
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self.into[name] = self.into.get(name, 0.0) + time.perf_counter() - start


def _announcer(store: Any, rank: int) -> Callable[[str], None]:
    """Writes the phase a rank enters to ``store`` (best effort: progress is only a diagnostic)."""

    def announce(phase: str) -> None:
        try:
            store.set(f"{_PHASE_KEY}/{rank}", phase)
        except Exception as exc:
            logger.debug("mpu-bridge selfcheck: rank %d could not record phase %s: %s", rank, phase, exc)

    return announce


def last_phase(store: Any, rank: int) -> Optional[str]:
    """The phase ``rank`` last announced in ``store``, or None.

    Example: ``last_phase(store, 3) == "collectives"`` for a rank stuck in a collective.
    """
    key = f"{_PHASE_KEY}/{rank}"
    try:
        return store.get(key).decode("utf-8", "replace") if store.check([key]) else None
    except Exception:  # the store itself may be gone with the rank that hosted it
        return None


# -- initialisation -----------------------------------------------------------------------


def _quiet_imports() -> None:
    import warnings

    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def resolve_backend(requested: str, local_world_size: int) -> str:
    """``auto``: nccl when CUDA has a GPU for each local rank, else gloo; ``nccl`` checks that.

    Example: ``resolve_backend("auto", 8)`` -> ``"gloo"`` on a machine without CUDA.
    """
    import torch

    cuda = torch.cuda.is_available()
    devices = torch.cuda.device_count() if cuda else 0
    if requested == "auto":
        return "nccl" if cuda and devices >= local_world_size else "gloo"
    if requested == "nccl" and devices < local_world_size:
        raise LayoutError(
            f"--backend nccl needs one CUDA device per local rank: {local_world_size} local ranks, "
            f"{devices} device(s) visible; use --backend gloo or fewer processes"
        )
    return requested


def _init_process_group(
    backend: str, rank: int, world_size: int, local_rank: int, timeout: float, store: Optional[Any]
) -> Any:
    """Initialise torch.distributed; returns the device collectives run on."""
    import inspect

    import torch
    import torch.distributed as dist

    kwargs: Dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout)}
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if "device_id" in inspect.signature(dist.init_process_group).parameters:
            kwargs["device_id"] = device  # binds the default group: the registry uses split_group
    if store is not None:
        kwargs.update(store=store, rank=rank, world_size=world_size)
    dist.init_process_group(backend, **kwargs)
    return device


def _import_parallel_state() -> Any:
    _quiet_imports()
    from megatron.core import parallel_state

    return parallel_state


def _initialize_megatron(parallel_state: Any, config: SelfCheckConfig) -> None:
    import inspect

    accepted = inspect.signature(parallel_state.initialize_model_parallel).parameters
    kwargs: Dict[str, Any] = {
        "tensor_model_parallel_size": config.tp,
        "pipeline_model_parallel_size": config.pp,
        "context_parallel_size": config.cp,
        "expert_model_parallel_size": config.ep[0],
        "order": config.order,
    }
    if config.etp is not None:
        kwargs["expert_tensor_parallel_size"] = config.etp
    kwargs["gtp_remat_size"] = config.gtp_remat
    kwargs["expert_gtp_remat_size"] = config.expert_gtp_remat
    if "create_gloo_process_groups" in accepted:
        kwargs["create_gloo_process_groups"] = False
    # An older release without a parameter is fine as long as we would pass its default.
    neutral = {"context_parallel_size": 1, "expert_model_parallel_size": 1, "order": DEFAULT_ORDER,
               "gtp_remat_size": 1, "expert_gtp_remat_size": 1}
    for name in [k for k in kwargs if k not in accepted]:
        if neutral.get(name, object()) != kwargs[name]:
            raise BridgeError(
                f"this megatron-core's initialize_model_parallel has no {name} parameter; "
                "drop the matching option (--cp, --ep, --etp, --order, --gtp-remat or --expert-gtp-remat) "
                "or upgrade megatron-core"
            )
        del kwargs[name]
    parallel_state.initialize_model_parallel(**kwargs)


def _megatron_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-core")
    except Exception:  # not installed as a distribution: say so rather than fail
        return "unknown version"


# -- the phases -----------------------------------------------------------------------------


class _Run:
    """One rank's check in progress: what teardown must close, and the result being filled."""

    def __init__(self, config: SelfCheckConfig, rank: int, world_size: int, store: Optional[Any]) -> None:
        self.config, self.rank, self.world_size = config, rank, world_size
        self.result = RankResult(rank=rank, world_size=world_size)
        self.phases = _Phases(self.result.phases, None if store is None else _announcer(store, rank))
        self.bridge: Any = None
        self.exporter: Any = None  # with --via-collection: the bridge whose collection is read
        self.modules: List[Tuple[str, SelfCheckConfig, Any]] = []  # with --module: (name, config, span bridge)
        self.parallel_state: Any = None
        self.default_store: Any = None

    def start(self, local_rank: int, local_world_size: int, store: Optional[Any]) -> Any:
        """Initialise torch.distributed (and megatron-core); returns the collectives' device."""
        config, phases = self.config, self.phases
        backend = phases.run("init_process_group", lambda: resolve_backend(config.backend, local_world_size))
        self.result.backend = backend
        device = phases.run(
            "init_process_group",
            lambda: _init_process_group(backend, self.rank, self.world_size, local_rank, config.timeout, store),
        )
        from torch.distributed import distributed_c10d

        self.default_store = distributed_c10d._get_default_store()
        if phases.announce is None:
            phases.announce = _announcer(self.default_store, self.rank)
        if config.with_megatron:
            self.parallel_state = phases.run("megatron import", _import_parallel_state)
            phases.run("megatron init", lambda: _initialize_megatron(self.parallel_state, config))
            self.result.mpu = f"megatron-core {_megatron_version()} parallel_state"
        return device

    def attach(self) -> None:
        from ..bridge import attach

        config = self.config
        if config.modules:
            self._attach_modules()
            return
        options: Dict[str, Any] = {"order": config.order, "agreement_timeout": config.timeout}
        if config.gpus_per_node is not None:
            options["gpus_per_node"] = config.gpus_per_node
        if not config.with_megatron:  # a full standalone layout: attach(None, tp=..., ...)
            options.update(tp=config.tp, pp=config.pp, cp=config.cp, ep=config.ep[0])
            if (config.gtp_remat, config.expert_gtp_remat) != (1, 1):
                options.update(gtp_remat=config.gtp_remat, expert_gtp_remat=config.expert_gtp_remat)
            if config.etp is not None:
                options["etp"] = config.etp
        self.bridge = self.phases.run("attach", lambda: attach(self.parallel_state, **options))
        if config.via_collection:  # the checks run over attach(collection): no parallel_state read
            self.exporter = self.bridge
            exporter = self.exporter  # the all-gather twins too, when the exports will prove them
            collection = self.phases.run("attach", lambda: exporter.process_group_collection(all_gather=config.exports))
            collection_options = {k: options[k] for k in ("agreement_timeout", "gpus_per_node") if k in options}
            self.bridge = self.phases.run("attach", lambda: attach(collection, **collection_options))
            self.result.mpu = "ProcessGroupCollection " + (
                f"of {self.result.mpu}" if config.with_megatron else "of a standalone layout"
            )
        self.result.strategy = self.bridge.strategy

    def probe(self, device: Any, on_groups_created: Optional[Callable[[], None]]) -> None:
        """Create every group (and, with ``exports``, the collection and meshes), then prove
        its members with collectives."""
        config, bridge = self.config, self.bridge
        if config.modules:
            groups = self._module_groups()
            self.result.stats = _summed(b.stats() for b in [self.bridge, *(b for _, _, b in self.modules)] if b)
            return self._prove(groups, device, on_groups_created)
        planned = expected_groups(config, self.world_size, self.rank)
        groups = self.phases.run("group creation", lambda: create_groups(bridge, config, planned))
        if config.exports:
            expected = expected_exports(config, self.world_size, self.rank, export_fields())
            groups = groups + self.phases.run(
                "exports", lambda: create_exports(bridge, config, expected, groups, device.type)
            )
        self.result.stats = dict(bridge.stats())
        self._prove(groups, device, on_groups_created)

    def _prove(self, groups: List[Tuple[Any, GroupCheck]], device: Any,
               on_groups_created: Optional[Callable[[], None]]) -> None:
        self.result.checks = [check for _, check in groups]
        if on_groups_created is not None:
            on_groups_created()
        self.phases.run(
            "collectives",
            lambda: run_collectives(groups, self.rank, self.world_size, device, self.config.inject_fault),
        )
        self.phases.current = None

    # -- a multi-module layout (--module) ------------------------------------------------------

    def _attach_modules(self) -> None:
        """Every module's span bridge, on every rank (as every rank builds every module's grid
        in megatron-core); with ``--via-collection`` the multi-module collection of them,
        and this rank's module attached from it."""
        from ..bridge import attach

        timeout = self.config.timeout
        for name, cfg in module_configs(self.config, self.world_size):
            options = dict(tp=cfg.tp, pp=cfg.pp, cp=cfg.cp, ep=cfg.ep[0], rank_offset=cfg.rank_offset,
                           local_world_size=cfg.local_world_size, agreement_timeout=timeout)
            if cfg.etp is not None:
                options["etp"] = cfg.etp
            self.modules.append((name, cfg, self.phases.run("attach", functools.partial(attach, None, **options))))
        spans = ", ".join(f"{n} {b.layout.ranks[0]}..{b.layout.ranks[-1]}" for n, _, b in self.modules)
        self.result.mpu = f"standalone rank spans ({spans})"
        mine, own = next((name, b) for name, _, b in self.modules if b.layout.holds(self.rank))
        if self.config.via_collection:
            from ..multi_module import multi_module_collection

            bridges = {name: b for name, _, b in self.modules}
            multi = self.phases.run("attach", lambda: multi_module_collection(bridges))
            self.bridge = self.phases.run("attach", lambda: attach(multi, module=mine, agreement_timeout=timeout))
            self.result.mpu = f"MultiModuleProcessGroupCollection of {self.result.mpu}, module {mine} attached"
        self.result.strategy = (self.bridge or own).strategy

    def _module_groups(self) -> List[Tuple[Any, GroupCheck]]:
        """Each module's groups, prepared by every rank in one round per module; its members
        ask for and check them (over the attached module with ``--via-collection``), the
        others check that the module's bridge refuses them (OutsideSpanError)."""
        kinds = [KIND_BY_METHOD[method].name for method in DENSE_METHODS]
        groups: List[Tuple[Any, GroupCheck]] = []
        for name, cfg, span_bridge in self.modules:
            planned = expected_groups(cfg, self.world_size, self.rank)
            if self.bridge is None:  # with --via-collection the collection's requests were the rounds
                self.phases.run("group creation", functools.partial(span_bridge.prepare, kinds,
                                                                    expert_sizes=list(cfg.ep), world=True))
            if span_bridge.layout.holds(self.rank):
                source = self.bridge if self.bridge is not None else span_bridge
                made = self.phases.run("group creation", functools.partial(create_groups, source, cfg, planned))
                for _, check in made:
                    check.label = f"{name}/{check.label}"
                groups.extend(made)
                continue
            refused = _refuses(span_bridge)
            for label, ranks in planned.items():
                check = GroupCheck(f"{name}/{label}", (), OUTSIDE, ranks, planner_ok=not ranks, member=False)
                if not refused:
                    check.error = f"the module's bridge did not refuse rank {self.rank}, outside its span"
                groups.append((None, check))
        return groups

    def fail(self, exc: BaseException) -> None:
        self.result.error = f"{type(exc).__name__}: {exc}"
        self.result.error_phase = self.phases.current
        if not isinstance(exc, BridgeError) and self.phases.current != "collectives":
            # (a failed collective is a fact about the fabric; its message says it all)
            self.result.error_traceback = traceback.format_exc()

    def teardown(self) -> None:
        """Close the bridge, then megatron-core's groups; leaves the default group to the caller."""
        try:
            for bridge in (self.bridge, self.exporter, *(b for _, _, b in self.modules)):
                if bridge is not None:
                    bridge.close()
            if self.parallel_state is not None:
                self.parallel_state.destroy_model_parallel()
        except Exception as exc:  # teardown must not mask the checks' outcome
            logger.warning("mpu-bridge selfcheck: teardown failed: %s", exc)


def _refuses(bridge: Any) -> bool:
    """Whether ``bridge`` refuses this rank with OutsideSpanError (it is outside its span)."""
    try:
        bridge.tensor_parallel()
    except OutsideSpanError:
        return True
    return False


def _summed(stats: Any) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for one in stats:
        for key, value in one.items():
            out[key] = out.get(key, 0) + value
    return out


def check_rank(
    config: SelfCheckConfig,
    rank: int,
    world_size: int,
    local_rank: int,
    local_world_size: int,
    store: Optional[Any],
    on_groups_created: Optional[Callable[[], None]] = None,
) -> Tuple[RankResult, Optional[Any]]:
    """Run every phase on this rank; never raises. Returns the result and the default store.

    ``store``: the rendezvous store to initialise from (None: the launcher's
    environment). ``on_groups_created`` runs between group creation and collectives.

    Example: ``result, store = check_rank(config, 0, 4, 0, 4, None)``; ``result.passed``.
    """
    run = _Run(config, rank, world_size, store)
    library_logger = logging.getLogger("mpu_bridge")
    collector = _WarningCollector(run.result.warnings)
    library_logger.addHandler(collector)
    try:
        device = run.start(local_rank, local_world_size, store)
        run.attach()
        run.probe(device, on_groups_created)
    except (Exception, SystemExit) as exc:  # report every failure; only an interrupt escapes
        run.fail(exc)
    finally:
        run.phases.run("teardown", run.teardown)
        library_logger.removeHandler(collector)
    return run.result, run.default_store


# -- process entry points ----------------------------------------------------------------------


def destroy_default_group() -> None:
    """Destroy torch.distributed's default group if there is one (warns on failure)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception as exc:
        logger.warning("mpu-bridge selfcheck: destroying the default group failed: %s", exc)


def _fault_exit() -> None:
    """``--inject-fault exit`` on the last rank: die before any collective."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_FAULT_EXIT_STATUS)


def fault_hook(config: SelfCheckConfig, rank: int, world_size: int) -> Optional[Callable[[], None]]:
    """What runs after group creation on this rank: the ``exit`` fault on the last rank, else nothing."""
    return _fault_exit if config.inject_fault == "exit" and rank == world_size - 1 else None


def setup_rank_process(verbose: bool) -> None:
    """Per-process settings of a rank: one OpenMP thread, quiet imports, logging with ``verbose``."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N ranks share the machine's cores
    _quiet_imports()
    if verbose:
        logging.basicConfig(level=logging.INFO, format="[rank %(process)d] %(name)s: %(message)s")


def spawned_rank(rank: int, world_size: int, config: SelfCheckConfig, spawned_at: float) -> RankResult:
    """One rank started by the local launcher: join the parent's store, check, return the result.

    ``spawned_at`` (``time.time()`` in the parent) times the process start, torch
    import included. Never raises: a failure is the result's ``error``.

    Example: ``LocalRanks(spawned_rank, 4, (config, time.time()), backend=None, store=True, ...)``.
    """
    setup_rank_process(config.verbose)
    if hasattr(signal, "SIGTERM") and os.name == "posix":
        # When the parent stops a rank (timeout, or after another rank died), the rank
        # prints where it was stuck to stderr before it goes.
        faulthandler.register(signal.SIGTERM, chain=True)
    try:
        import torch.distributed as dist

        started = time.time() - spawned_at
        wait = datetime.timedelta(seconds=config.timeout)
        address, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])  # the launcher's store
        store = dist.TCPStore(address, port, is_master=False, timeout=wait)
        hook = fault_hook(config, rank, world_size)
        result, _ = check_rank(config, rank, world_size, rank, world_size, store, hook)
        result.phases["process start"] = started
        return result
    except BaseException as exc:  # e.g. the store was unreachable: report it, whatever it is
        return RankResult(
            rank=rank,
            world_size=world_size,
            error=f"{type(exc).__name__}: {exc}",
            error_phase="start",
            error_traceback=traceback.format_exc(),
        )
