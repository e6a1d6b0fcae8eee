"""The PostgreSQL cluster `make bench-deploy` and the deployment test start: a server of its own, so whatever stops
the process that started it must stop it too."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys, time
from quant_pipeline.cli.bench_deploy import running_postgres
with running_postgres(("probe",)) as urls:
    print(urls["probe"], flush=True)
    time.sleep(600)
"""


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_file_port(folder: Path) -> int | None:
    """The port in a running cluster's `postmaster.pid` (its fourth line), None where there is none."""
    try:
        return int((folder / "data" / "postmaster.pid").read_text().splitlines()[3])
    except (OSError, IndexError, ValueError):
        return None


def test_a_cluster_is_stopped_and_its_folder_removed_when_its_process_gets_sigterm():
    """A CI timeout or `kill` sends SIGTERM: the cluster used to outlive the process, its port taken and its folder
    left in /tmp. Now SIGTERM exits through the context's cleanup (exit status 143)."""
    before = set(Path("/tmp").glob("qp-postgres-*"))
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()  # printed once the cluster answers and the database exists
    assert url.startswith("postgresql+psycopg2://postgres@127.0.0.1:") and url.endswith("/probe"), url
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    # another test may start a cluster meanwhile: this one's is the new folder whose server says this port
    (folder,) = [f for f in set(Path("/tmp").glob("qp-postgres-*")) - before if _pid_file_port(f) == port]
    assert _listening(port)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not folder.exists()
    deadline = time.monotonic() + 10
    while _listening(port) and time.monotonic() < deadline:  # `pg_ctl stop -m fast` waits; this is a margin
        time.sleep(0.2)
    assert not _listening(port)
