"""A real two-node Ray cluster on 127.0.0.1 for the `--ray` tests, started once per test session.

Any test takes it by naming a `ray_cluster` argument (tests/conftest.py imports it):
the head and a second node get one CPU each, so two tasks run at once, on two raylets. The
test process connects as the driver, as `tilecore ... --ray ADDRESS` would; ray_session sees Ray already
connected and leaves the connection to this fixture.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Ray resolves 127.0.0.1 in an address to the machine's outward IP (services.resolve_ip_for_localhost), where
# a cluster bound to 127.0.0.1 does not listen; with this switch it keeps the loopback address. Set before
# Ray is imported, and inherited by every driver and node process the tests start.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
NODE = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(NODE))
    cluster.add_node(**{k: v for k, v in NODE.items() if k != "include_dashboard"})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        yield cluster.address
    finally:
        ray.shutdown()
        cluster.shutdown()


def task_processes(function_name: str) -> list[int]:
    """PIDs of Ray worker processes executing a task of `function_name` now (Ray titles them `ray::NAME`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::{function_name}"):
            found.append(int(entry.name))
    return found


def kill_first_task(function_name: str, timeout_s: float = 120.0) -> int:
    """SIGKILL the first worker seen executing `function_name` (waits for one to start); returns its PID."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in task_processes(function_name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            return pid
        time.sleep(0.05)
    raise AssertionError(f"no Ray worker ran {function_name} within {timeout_s} s")
