"""Search trials as Ray tasks: as many trials in flight as the cluster has CPUs (one CPU
each), spread over its nodes; each result is stored in the study as it arrives and a new
trial takes its place. A trial's task compiles and scores it on the worker, so the
searched file's folder, the task files, the search folder and the cache must be at the
same paths on every node (shared storage), as for `cfmc compile --executor ray`."""
from __future__ import annotations

from cfmlang.cluster import fetched as task_result
from cfmlang.compiler.executors.ray_cluster import WORKER_HINT
from cfmlang.search.driver import Interrupted, finished_trials, is_stop
from cfmlang.search.trial import TrialJob, TrialOutcome, run_trial


def ray_trial(job: TrialJob) -> TrialOutcome:
    """A Ray task: one trial, on whichever node runs it."""
    import ray

    return run_trial(job, ray.get_runtime_context().get_node_id())


def run_on_ray(driver) -> None:
    import ray

    from cfmlang.compiler.executors import executor_named

    executor = executor_named("ray", driver.settings.address)
    cpus = executor.connect()
    remote = ray.remote(num_cpus=1, max_retries=2, scheduling_strategy="SPREAD")(ray_trial)
    flight: dict = {}        # object ref -> the trial it runs
    try:
        while driver.remaining() > len(flight) or flight:
            while driver.remaining() > len(flight) and len(flight) < max(cpus, 1):
                trial, job = driver.next_job()
                if job is not None:
                    flight[remote.remote(job)] = trial
            if not flight:
                continue
            ready, _ = ray.wait(list(flight), num_returns=1)
            for ref in ready:
                trial = flight.pop(ref)
                driver.tell(trial, fetched(ref, trial))
    except BaseException as exc:
        for ref, trial in flight.items():
            ray.cancel(ref, force=True)
            driver.interrupt(trial)
        if isinstance(exc, Exception) and not is_stop(exc):
            raise
        raise Interrupted(len(finished_trials(driver.study)), driver.budget, exc) from None


def fetched(ref, trial) -> TrialOutcome:
    return task_result(ref, f"trial {trial.number}", "E242", WORKER_HINT)
