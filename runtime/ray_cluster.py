"""Connecting to a Ray cluster for `--ray` (train, eval and run scale out through it; docs/ray.md).

Ray is the `ray` extra: training machines and archive scorers install it, devices never do, and nothing
here imports it until a command asks for `--ray`. The address forms:

* `auto`: the cluster already running on this machine (`ray start --head`), found the way Ray finds it;
* `local`: a private Ray instance started for this command on this machine and stopped after it;
* `HOST:PORT` (or `ray://HOST:PORT`): that cluster's head.

Every worker reads the dataset, run folder and bundle at the paths the driver names, so those live on a
file system all nodes share (or at the same path on each node). Only the driver writes results.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from tilecore.runtime.errors import TilecoreError

ADDRESS_HELP = "auto (the cluster on this machine), local (a private one for this command) or HOST:PORT"


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise TilecoreError("--ray needs the 'ray' extra: pip install 'tilecore[ray]'") from None
    return ray


def check_address(address: str) -> str:
    """`address` if it is one of the forms ADDRESS_HELP names; a one-line refusal otherwise."""
    if address in ("auto", "local"):
        return address
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not host or not port.isdigit():
        raise TilecoreError(f"--ray {address!r}: expected {ADDRESS_HELP}")
    return address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse, in one line, a head that accepts no connection (Ray itself would retry for minutes)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise TilecoreError(f"--ray {address}: no Ray cluster reachable ({exc.strerror or exc})") from None


@contextmanager
def ray_session(address: str) -> Iterator[ModuleType]:
    """Ray, connected to the cluster at `address` for the duration of the block (then disconnected)."""
    ray = import_ray()
    check_address(address)
    if address not in ("auto", "local"):
        check_reachable(address)
    if ray.is_initialized():  # a caller (a test, a notebook) already chose the cluster: use it as it is
        yield ray
        return
    try:
        # the driver's own log lines stay tilecore's: Ray's startup chatter and workers' stdout stay out of them
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
        if address == "local":  # private to this machine: listening on the loopback address only
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise TilecoreError(f"--ray {address}: no Ray cluster reachable ({first_line(exc)})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (Ray's run to many), else its type's name."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def task_error(exc: BaseException) -> BaseException:
    """The error a Ray task raised, as the caller would have seen it locally: a TilecoreError inside a
    RayTaskError comes back as itself (one line for the user), anything else stays Ray's (a bug, traced)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, TilecoreError) else exc


def get(ray: ModuleType, refs: Any) -> Any:
    """`ray.get(refs)`, with a task's TilecoreError re-raised as itself and a lost worker as one line."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        raise task_error(exc) from None
    except ray.exceptions.RayError as exc:  # a worker, actor or node lost for good, after its retries
        lost = f"{type(exc).__name__}: {first_line(exc)}"
        raise TilecoreError(f"--ray: the cluster lost the work ({lost}); rerun the command to resume") from None


def first_done(ray: ModuleType, pending: Sequence[Any]) -> Any:
    """The first of `pending` to finish (blocks until one does)."""
    done, _ = ray.wait(list(pending), num_returns=1)
    return done[0]
