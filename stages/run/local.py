"""The local executor: items processed in this process (workers <= 1) or in spawned worker
processes, each of which calls the stage's `setup()` once. A worker that dies takes its in-flight
items with it; each of those is retried alone, and one that kills its worker again becomes a
`worker_crashed` row."""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator

from stages.run.contract import Stage, crash_rows, safe_process

_WORKER_STAGE: Stage | None = None


def _worker_init(stage: Stage) -> None:
    global _WORKER_STAGE
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_STAGE = stage
    stage.setup()


def _worker_process(item: dict) -> list[dict]:
    assert _WORKER_STAGE is not None
    return safe_process(_WORKER_STAGE, item)


def execute_local(stage: Stage, items: list[dict], workers: int) -> Iterator[tuple[str, list[dict]]]:
    """Yield (item id, output rows) as items finish, in any order."""
    if workers <= 1:
        stage.setup()
        for it in items:
            yield it["id"], safe_process(stage, it)
        return
    ctx = mp.get_context("spawn")
    queue = list(reversed(items))
    suspects: list[dict] = []
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(stage,))
    try:
        running = {}
        while queue or running:
            while queue and len(running) < 2 * workers:
                it = queue.pop()
                running[pool.submit(_worker_process, it)] = it
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                it = running.pop(fut)
                try:
                    yield it["id"], fut.result()
                except BrokenProcessPool:
                    broken = True
                    suspects.append(it)
            if broken:  # every in-flight item is a suspect; each is retried alone below
                suspects.extend(running.values())
                running.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(stage,))
        for it in suspects:
            with ProcessPoolExecutor(1, mp_context=ctx, initializer=_worker_init, initargs=(stage,)) as solo:
                try:
                    yield it["id"], solo.submit(_worker_process, it).result()
                except BrokenProcessPool:
                    yield it["id"], crash_rows(stage, it)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


