"""pipellmd runs under SCHED_BATCH (sched_batch, on by default): a doorbell or a declare from the serving
process wakes the daemon without preempting it. Every thread of the daemon and of its crypto workers
inherits the policy; with sched_batch = false they all stay SCHED_OTHER."""

from __future__ import annotations

import os

import psutil
import pytest

from pipellm_daemon.launcher import DaemonProcess

from .daemon_harness import wait_for, worker_procs


def _policies(pid: int) -> set[int]:
    """The scheduling policy of every thread of `pid`."""
    return {os.sched_getscheduler(t.id) for t in psutil.Process(pid).threads()}


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("batch", "policy"), [(True, os.SCHED_BATCH), (False, os.SCHED_OTHER)])
def test_daemon_and_workers_run_under_the_configured_policy(batch: bool, policy: int) -> None:
    with DaemonProcess(workers=2, sched_batch=batch) as d:
        wait_for(lambda: len(worker_procs(d.pid)) == 2, "two crypto workers")
        procs = [d.pid, *(p.pid for p in worker_procs(d.pid))]
        assert {pid: _policies(pid) for pid in procs} == {pid: {policy} for pid in procs}
