"""The Ray cluster every `--executor ray [--address ADDR]` command runs on: the names of
the executors, the check of the two options, the connection (the diagnostics E240,
E241 and E243 are the same for every command) and the fetching of a task's result."""
from __future__ import annotations

from cfmlang.diagnostics import CompileError, error

EXECUTORS = ("local", "ray")


def check_executor(name: str, address: str | None) -> None:
    """E243 for an unknown executor or an address without `ray`; E240 when `ray` is
    asked for and not installed."""
    if name not in EXECUTORS:
        raise CompileError([error("E243", f"unknown executor `{name}`", None,
                                  f"the executors: {', '.join(EXECUTORS)}")])
    if name == "local" and address is not None:
        raise CompileError([error("E243", "an address was given for the local executor", None,
                                  "add `--executor ray` to run on the Ray cluster at that address")])
    if name == "ray":
        require_ray()


def require_ray() -> None:
    try:
        import ray  # noqa: F401
    except ImportError:
        raise CompileError([error("E240", "the Ray executor needs the `ray` package, which is not installed",
                                  None, "install it: pip install 'cfmlang[ray]' (or pip install ray)")]) from None


def connect(address: str | None) -> int:
    """Join the cluster at `address` unless this process already belongs to one (None:
    start a local one) and return its CPU count (E241 when it cannot be reached)."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CompileError([error("E241", f"cannot connect to the Ray cluster at "
                                      f"{address or 'a new local cluster'}: {exc}", None,
                                      "start it with `ray start --head` (then give its address as "
                                      "--address HOST:PORT), or leave out --address for a local one")]) from None
    return int(ray.cluster_resources().get("CPU", 1))


def fetched(ref, what: str, code: str, hint: str):
    """The result of the Ray task `ref`. A diagnostic raised on a worker is passed on as it
    is; the task's own failure, or its loss with its node after Ray's retries, is `code`
    naming `what` (e.g. "trial 3"), with `hint`."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CompileError):
            raise cause from None
        raise CompileError([error(code, f"{what} failed on the Ray cluster: {type(cause).__name__}: {cause}",
                                  None, hint)]) from None
    except ray.exceptions.RayError as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CompileError([error(code, f"the Ray cluster lost {what}: {type(exc).__name__}: {first}",
                                  None, hint)]) from None
