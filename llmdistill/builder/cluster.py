"""Build's compute: Ray Data maps over parts, on a local Ray or an existing cluster.

There is one code path: one worker is a cluster of one CPU. On a machine without a cluster,
the first build of a process starts a local Ray with ``workers`` CPUs (default: the machine's
cores) and keeps it for the next builds of the process (a start costs several seconds); with
``ray_address`` (or ``RAY_ADDRESS``) it attaches to a running cluster, e.g. the one
``configs/recipes/r1-qwen7b/slurm/build.sbatch`` starts on the allocated nodes.

Ray is kept quiet: its logs go to its session directory, not to the terminal, so a failed
build still ends in one line. A worker returns a :class:`~llmdistill.config.base.UserError`
(bad input or settings) as data, and the driver raises it as itself; any other error is a
crash and keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmdistill.builder.tokenize import ShippedTokenizer
from llmdistill.config.base import UserError
from llmdistill.log import get_logger

logger = get_logger(__name__)

_started_cpus: int | None = None  # CPUs of the local Ray this process started (None: none started)
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


@dataclass(frozen=True)
class Runtime:
    """Where the build runs: ``address`` (``local`` or the cluster's), its CPUs, and the concurrency used."""

    address: str
    cpus: int
    workers: int

    def to_dict(self) -> dict[str, Any]:
        return {"address": self.address, "cpus": self.cpus, "workers": self.workers}


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for handler in logging.getLogger("ray.data").handlers:
        if handler.name == "console":  # Ray Data's own console handler: its log file keeps everything
            handler.setLevel(logging.CRITICAL + 1)


def start_ray(workers: int | None, address: str | None) -> Runtime:
    """Make sure this process is connected to Ray; start a local one if it is not.

    Args:
        workers: parallel part tasks; None: the machine's cores (local) or all the cluster's CPUs.
        address: a cluster to attach to (``ray_address``); None: ``RAY_ADDRESS`` or a local Ray.

    Returns:
        The runtime the build runs on.
    """
    global _started_cpus
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    want = workers or os.cpu_count() or 1
    if ray.is_initialized() and _started_cpus is not None and (address or want > _started_cpus):
        ray.shutdown()  # our local Ray is too small for this build, or the build wants a cluster
        _started_cpus = None
    if not ray.is_initialized():
        started = time.time()
        ray_logger = logging.getLogger("ray")
        level = ray_logger.level
        ray_logger.setLevel(logging.ERROR)  # ray.init's notices (dashboard, token auth) would reach the terminal
        try:
            env = {"env_vars": {var: "1" for var in _THREAD_VARS} | {"TOKENIZERS_PARALLELISM": "false"}}
            if address:
                ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=env)
            else:
                # idle workers stay (with their imports and cached tokenizer) for the next phase and build
                ray.init(num_cpus=want, include_dashboard=False, log_to_driver=False, configure_logging=False,
                         runtime_env=env, _system_config={"idle_worker_killing_time_threshold_ms": 600_000})
                _started_cpus = want
        finally:
            ray_logger.setLevel(level)
        logger.info("Ray %s ready in %.1f s", address or f"local ({want} CPUs)", time.time() - started)
    _quiet_ray_data()
    cpus = int(ray.cluster_resources().get("CPU", want))
    return Runtime(address=address or "local", cpus=cpus, workers=workers or cpus)


#: From this many parts per worker on, a phase runs on a pool of actors, not of tasks (see :func:`map_parts`).
ACTOR_PARTS_PER_WORKER = 8


def uses_actors(parts: int, runtime: Runtime) -> bool:
    """Whether a phase of ``parts`` parts runs on an actor pool (else on tasks): see :func:`map_parts`."""
    return parts >= ACTOR_PARTS_PER_WORKER * runtime.workers


def _warm(tokenizer: ShippedTokenizer) -> int:
    """Import what the part tasks import and unpickle the tokenizer into the worker's cache."""
    from llmdistill.builder import rows, shards  # noqa: F401

    tokenizer.get()
    return os.getpid()


def warm_up(runtime: Runtime, tokenizer: ShippedTokenizer) -> None:
    """Start ``runtime.workers`` workers now, in the background, for the phases that run on tasks: a
    fresh worker spends seconds on imports and on the tokenizer, which then overlaps with what
    the driver does before phase A's first part runs (the benchmarks' n-gram index, the start of
    Ray Data's executor), and the tasks of every phase reuse it."""
    import ray

    task = ray.remote(num_cpus=1)(_warm)
    ref = ray.put(tokenizer)
    for _ in range(min(runtime.workers, runtime.cpus)):
        task.remote(ref)


def _run(row: dict[str, Any], fn: Callable[[dict[str, Any], Any], dict[str, Any]], context: Any) -> dict[str, Any]:
    """One part in a worker: ``fn(task, context)``; a user error comes back as data."""
    import sys

    if "torch" in sys.modules:  # one CPU per worker: no thread pools fighting over it
        sys.modules["torch"].set_num_threads(1)
    try:
        result = fn(pickle.loads(row["task"]), context)
    except UserError as err:
        return {"part": row["part"], "result": b"", "error": pickle.dumps(err)}
    result["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return {"part": row["part"], "result": pickle.dumps(result), "error": b""}


class _PartRunner:
    """A Ray Data actor that runs parts one after another (:func:`_run`), with a second part queued."""

    def __init__(self, fn: Callable[[dict[str, Any], Any], dict[str, Any]], context: Any) -> None:
        self.fn, self.context = fn, context

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        return _run(row, self.fn, self.context)


def map_parts(fn: Callable[[dict[str, Any], Any], dict[str, Any]], tasks: list[dict[str, Any]], context: Any,
              runtime: Runtime) -> Iterator[dict[str, Any]]:
    """Run ``fn(task, context)`` for every task as a Ray Data map, ``runtime.workers`` at a time.

    Few parts per worker run as Ray tasks on the workers :func:`warm_up` started, which keep their
    imports and tokenizer from part to part and from build to build. Many parts
    (:data:`ACTOR_PARTS_PER_WORKER` a worker and more) run on a pool of actors with a second part
    queued on each: Ray Data's scheduler looks for finished tasks every 0.1 s once every CPU is
    taken, which left a task slot idle about 0.15 s between parts on this machine, while an actor
    has its next part at hand. An actor pool costs a worker start per phase (seconds), which only
    many parts repay.

    Args:
        fn: a module-level function (workers import it); it returns a small picklable dict.
        tasks: one dict per part, each with its ``part`` index.
        context: what every task shares (config, tokenizer paths ...): put in Ray's object store
            once, not once per part.
        runtime: from :func:`start_ray`.

    Yields:
        ``fn``'s results as the tasks finish (any order), each with the ``worker`` (host:pid) that ran it.

    Raises:
        UserError: the first one a task raised, as itself.
    """
    if not tasks:
        return
    import ray.data

    rows = [{"part": t["part"], "task": pickle.dumps(t)} for t in tasks]
    shared = {"fn": fn, "context": context}
    size = max(1, min(runtime.workers, len(rows)))
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
    if uses_actors(len(rows), runtime):
        pool = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2)
        try:
            # no actor restarts: a dead worker fails the build, whose re-run resumes from the finished parts
            # (with restarts, Ray logs an error line for every actor of the pool). Extra remote arguments are
            # deprecated in Ray 2.60 and go in 2.64, where Ray's default applies.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                dataset = dataset.map(_PartRunner, fn_constructor_kwargs=shared, num_cpus=1, compute=pool,
                                      max_restarts=0)
        except TypeError:
            dataset = dataset.map(_PartRunner, fn_constructor_kwargs=shared, num_cpus=1, compute=pool)
    else:
        dataset = dataset.map(_run, fn_kwargs=shared, num_cpus=1, compute=ray.data.TaskPoolStrategy(size=size))
    for row in dataset.iter_rows():
        if row["error"]:
            raise pickle.loads(row["error"])
        yield pickle.loads(row["result"])
