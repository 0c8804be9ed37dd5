"""Trials as Ray tasks: one long-lived actor per worker slot, each holding a :class:`Worker`.

An actor loads the VLM once and scores many points in place, just as a local sweep does; the
driver (the ``skillgraft sweep`` process) keeps the search and the SQLite store and hands points
out as actors become free. Checkpoint paths must be readable on every node (a shared filesystem).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SkillgraftError
from .worker import Worker


class _WorkerActor:
    """A Ray actor process of the sweep's own: it sets its torch thread count to its CPU share."""

    def __init__(self, kwargs: dict[str, Any], threads: int):
        torch.set_num_threads(threads)
        self.w = Worker(**kwargs)

    def baseline(self):
        return self.w.baseline()

    def run(self, point: dict[str, Any]):
        return self.w.run(point)


def connect(address: str | None) -> Any:
    """``ray`` connected to ``address`` (``auto``, ``HOST:PORT``, ``ray://...``); reuses a live connection."""
    try:
        import ray  # deferred: ray, an optional extra
    except ImportError:
        raise SkillgraftError("--ray-address needs the ray package: pip install 'skillgraft[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SkillgraftError(f"cannot connect to the Ray cluster at {address!r}: {first}") from None
    return ray


class RayPool:
    """``capacity`` actors; ``submit`` a point, ``wait_one`` for whichever finishes first."""

    backend = "ray"

    def __init__(self, address: str | None, worker_kwargs: dict[str, Any], *, workers: int | None = None,
                 cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0):
        ray = connect(address)
        self.ray = ray
        if workers is None:
            cpus = float(ray.cluster_resources().get("CPU", 1.0))
            workers = max(1, int(cpus // max(cpus_per_trial, 1e-9)))
        threads = max(1, int(cpus_per_trial))
        actor_cls = ray.remote(num_cpus=cpus_per_trial, num_gpus=gpus_per_trial)(_WorkerActor)
        self.actors = [actor_cls.remote(worker_kwargs, threads) for _ in range(workers)]
        self.idle = list(self.actors)
        self.inflight: dict[Any, tuple[Any, str]] = {}
        self.capacity = workers

    def baseline(self) -> tuple[dict[str, float], dict[str, float]]:
        return self._get(self.actors[0].baseline.remote())

    def submit(self, key: str, point: dict[str, Any]) -> None:
        actor = self.idle.pop()
        self.inflight[actor.run.remote(point)] = (actor, key)

    def wait_one(self) -> tuple[str, Any, BaseException | None]:
        ready, _ = self.ray.wait(list(self.inflight), num_returns=1)
        ref = ready[0]
        actor, key = self.inflight.pop(ref)
        self.idle.append(actor)
        try:
            return key, self._get(ref), None
        except Exception as e:  # a failed trial: recorded, the sweep goes on
            return key, None, e

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, BaseException) else RuntimeError(str(e))) from None

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass


class LocalPool:
    """The same interface in this process: one point at a time."""

    backend = "local"

    def __init__(self, worker_kwargs: dict[str, Any]):
        self.worker = Worker(**worker_kwargs)
        self.capacity = 1
        self.queue: list[tuple[str, dict[str, Any]]] = []

    def baseline(self) -> tuple[dict[str, float], dict[str, float]]:
        return self.worker.baseline()

    def submit(self, key: str, point: dict[str, Any]) -> None:
        self.queue.append((key, point))

    def wait_one(self) -> tuple[str, Any, BaseException | None]:
        key, point = self.queue.pop(0)
        try:
            return key, self.worker.run(point), None
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            return key, None, e

    @property
    def inflight(self) -> list:
        return self.queue

    def close(self) -> None:
        self.worker.close()
