"""Real servers on loopback for the tests: a free port, a process group of its own, a log, a clean stop."""

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from quant_pipeline.cli.bench_deploy import free_port  # noqa: F401 - the one way to pick a port

REPO_ROOT = Path(__file__).resolve().parents[1]


def wait_until(
    probe: Callable[[], object],
    timeout: float,
    interval: float = 2.0,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
):
    """Call `probe` until it returns something truthy (returned) or `timeout` seconds pass (fails).
    Exceptions from the probe count as "not yet"; a server process that exits ends the wait early."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited with code {proc.returncode} before it was ready\n{tail(log)}")
        try:
            value = probe()
            if value:
                return value
        except Exception as e:  # not up yet, or still loading
            last_error = e
        time.sleep(interval)
    pytest.fail(f"not ready after {timeout:.0f}s (last error: {last_error!r})\n{tail(log)}")


def start_server(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server in its own process group (so it and its children can be stopped together),
    with stdout and stderr going to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_process_group(proc: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever is still there after `timeout`."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:  # the leader may be gone while children (code server, daemon, workers) linger
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=timeout)


def tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "--- last server output ---\n" + "\n".join(text)
