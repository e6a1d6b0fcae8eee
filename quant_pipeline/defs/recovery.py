"""Crash safety: a run whose process died is marked failed at the next start, never left STARTED.

A SIGKILL (OOM killer, a closed laptop, `kill -9` during GPTQ) gives Dagster no chance to record
the end of a run: it would show as STARTED for ever and, with a one-run queue, block the UI. Every
run tags itself with the pid and host of the process executing it when its resources start; any
later run on the same host fails the runs whose process is gone. Runs launched by the daemon are
also covered by Dagster's own run monitoring (`dagster.yaml`). What such a run left half-written in
the store is swept by `ArtifactStore.sweep_stale` at the same moment, so nothing partial is reused.
"""

import os
import socket

import dagster as dg

from quant_pipeline.core.store import pid_alive

PID_TAG = "quant_pipeline/pid"
HOST_TAG = "quant_pipeline/host"
UNFINISHED = [dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]


def process_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def fail_orphaned_runs(instance: dg.DagsterInstance, current_run_id: str | None = None) -> list[str]:
    """Mark failed every unfinished run of this host whose process no longer exists; return their IDs."""
    host, failed = socket.gethostname(), []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED)):
        pid = run.tags.get(PID_TAG)
        if run.run_id == current_run_id or run.tags.get(HOST_TAG) != host or not (pid or "").isdigit():
            continue
        if int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        instance.report_run_failed(run, f"the process running it (pid {pid}) died before the run finished")
        failed.append(run.run_id)
    return failed
