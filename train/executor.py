"""Where training and evaluation work runs: in this process, one job after another, or as Ray tasks.

Work is a list of independent jobs (a memory bank, a category's calibration, a category's evaluation);
each is a module-level function and its arguments, so Ray can send it to any node. Results come back to
the driver, which alone writes files: `on_done(job, result)` writes what a job made, atomically, and
returns the jobs that become possible then (a category's calibration once its last bank is written). A
killed Ray worker costs only its task (Ray reruns it, `ray.max_retries` times); a killed driver costs
the jobs whose results were not yet written, and a rerun resumes from the files.

Locally the jobs run depth first (a category's calibration runs before the next category's banks), with
the caller's progress bars and in-memory models passed as `local_kwargs`; through Ray they run as soon
as a slot is free, each on a worker that loads the models it needs from the run folder.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from tilecore.runtime.ray_cluster import first_done, get


@dataclass(frozen=True)
class Job:
    """One unit of work: `run(*args, **local_kwargs)` locally, `run(*args)` on a Ray worker."""

    run: Callable[..., Any]  # a module-level function (Ray ships it by its import path)
    args: tuple
    label: str


@dataclass
class Executor:
    """Runs jobs locally (`ray` None) or as Ray tasks with `options` (num_cpus, num_gpus, max_retries)."""

    ray: ModuleType | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return "local" if self.ray is None else "ray"

    def execute(
        self,
        jobs: list[Job],
        on_done: Callable[[Job, Any], list[Job]],
        local_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Run `jobs` and every job their `on_done` calls return, until none is left."""
        if self.ray is None:
            queue = deque(jobs)
            while queue:
                job = queue.popleft()
                queue.extendleft(reversed(on_done(job, job.run(*job.args, **(local_kwargs or {})))))
            return
        ray = self.ray
        remote: dict[Callable, Any] = {}
        pending: dict[Any, Job] = {}  # object ref -> its job

        def submit(job: Job) -> None:
            if job.run not in remote:
                remote[job.run] = ray.remote(job.run).options(**self.options)
            pending[remote[job.run].remote(*job.args)] = job

        for job in jobs:
            submit(job)
        try:
            while pending:
                ref = first_done(ray, list(pending))
                job = pending.pop(ref)
                for follow in on_done(job, get(ray, ref)):
                    submit(follow)
        finally:
            for ref in pending:  # a failed job or an interrupt: nothing else of this run keeps the cluster busy
                ray.cancel(ref, force=True)


def executor_info(executor: Executor) -> dict[str, Any]:
    """What the run's metadata records about where its work ran."""
    if executor.ray is None:
        return {"executor": "local"}
    nodes = [n for n in executor.ray.nodes() if n.get("Alive")]
    resources = executor.ray.cluster_resources()
    return {
        "executor": "ray",
        "nodes": len(nodes),
        "cluster_cpus": resources.get("CPU", 0),
        "cluster_gpus": resources.get("GPU", 0),
        "task_options": dict(executor.options),
    }
