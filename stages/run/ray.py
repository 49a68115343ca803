"""The Ray executor: the same contract as `stages.run.local.execute_local` on a Ray cluster.

`workers` actors each hold one copy of the stage (its `setup()` runs once per actor, as in a local
worker process) and process items sent to them, at most two in flight per actor; results come back
in completion order and the runner writes resume parts and the manifest on the driver exactly as
for local processes, so the same stage code gives the same manifest. An actor that dies turns its
in-flight items into `worker_crashed` error rows and is replaced.

Address: `--ray-address` (e.g. ray://head:10001 or auto), else $RAY_ADDRESS, else a local Ray
instance started for the run and shut down after it. On a remote cluster the project's packages
are shipped with the job (`runtime_env.py_modules`); their dependencies must be installed on the nodes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from stages.run.contract import crash_rows, safe_process

PACKAGES = ("stages", "manifests", "models", "vidu_kernels")


class RayUnavailable(ValueError):
    """ray is not installed or the cluster cannot be reached (one-line message)."""


def _connect(address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it and must shut it down."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable("the ray executor needs ray: pip install 'vidu[ray]'") from None
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    if address:
        root = Path(__file__).resolve().parents[2]
        kwargs["runtime_env"] = {"py_modules": [str(root / p) for p in PACKAGES]}
    else:
        kwargs["num_cpus"] = os.cpu_count() or 1
    if address and address != "auto":
        _reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except Exception as e:  # ConnectionError, RuntimeError, ValueError: all mean "no cluster here"
        raise RayUnavailable(f"cannot connect to Ray at {address}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return True


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a host:port nothing listens on (ray.init would retry for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port or 6379)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RayUnavailable(f"cannot connect to Ray at {address}: {e}") from None


def _actor_class():
    import ray

    @ray.remote(num_cpus=1)
    class StageActor:
        def __init__(self, stage):
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            self.stage = stage
            stage.setup()

        def process(self, item: dict) -> list[dict]:
            return safe_process(self.stage, item)

    return StageActor


def execute_ray(stage, items: list[dict], workers: int, address: str | None) -> Iterator[tuple[str, list[dict]]]:
    """Yield (item id, rows) as the actors finish items."""
    import ray
    from ray.exceptions import RayActorError, WorkerCrashedError

    started = _connect(address)
    actor_cls = _actor_class()
    actors = [actor_cls.remote(stage) for _ in range(max(1, workers))]
    queue = list(reversed(items))
    running: dict = {}  # ObjectRef -> (item, actor index)
    load = [0] * len(actors)
    try:
        while queue or running:
            for a in range(len(actors)):
                while queue and load[a] < 2:
                    it = queue.pop()
                    running[actors[a].process.remote(it)] = (it, a)
                    load[a] += 1
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                it, a = running.pop(ref)
                load[a] -= 1
                try:
                    yield it["id"], ray.get(ref)
                except (RayActorError, WorkerCrashedError):
                    yield it["id"], crash_rows(stage, it)
                    stale = [r for r, (_, b) in running.items() if b == a]
                    for r in stale:  # the dead actor's other items go back to the queue
                        queue.append(running.pop(r)[0])
                    load[a] = 0
                    ray.kill(actors[a], no_restart=True)
                    actors[a] = actor_cls.remote(stage)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
