"""A real PostgreSQL server for the deployment tests: Debian's `postgresql` binaries (`make install` puts them in
place), a fresh cluster in a temporary folder, on a free loopback port, stopped and removed afterwards.

PostgreSQL refuses to run as root, so under root (CI) the cluster belongs to the `postgres` user the Debian
package creates, and its folder lies outside pytest's root-only temporary tree.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quant_pipeline_tests.servers import free_port


def _binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make install` (as root it installs postgresql)")
    return found[-1]


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def running_postgres(databases: tuple[str, ...] = ("dagster", "mlflow")) -> Iterator[dict[str, str]]:
    """Start a cluster with the named databases; yield each one's URL (user `postgres`, trust on loopback)."""
    root = Path(tempfile.mkdtemp(prefix="qp-postgres-", dir="/tmp"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
    data, port = root / "data", free_port()
    subprocess.run(
        _as_owner([_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]),
        check=True, capture_output=True,
    )  # fmt: skip
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
    start = [_binary("pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start"]
    subprocess.run(_as_owner(start), check=True, capture_output=True)
    try:
        for db in databases:
            subprocess.run(
                [_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                check=True, capture_output=True,
            )  # fmt: skip
        yield {db: f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{db}" for db in databases}
    finally:
        subprocess.run(_as_owner([_binary("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
