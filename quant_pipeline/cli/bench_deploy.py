"""`make bench-deploy`: what the deployment beyond one machine costs and buys, on a tiny model. A command, not a test.

Three cold audits of a 2-layer random Llama (8 calibration samples, 4 items per slice), each in a fresh store and
its own `quant-pipeline audit` process: on the embedded defaults (Dagster and MLflow on SQLite); on a PostgreSQL
Dagster instance with an MLflow tracking server on PostgreSQL (proxied artifacts, weights bundled); and two such
audits of two models at once. Prints wall seconds, audits per hour and the server setup's overhead against SQLite.
The PostgreSQL cluster is Debian's binaries, started in a temporary folder (`running_postgres`, which the
deployment test uses too).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from quant_pipeline.core.paths import DEFAULT_CALIBRATION, PACKAGE_DIR

BIN_DIR = Path(sys.executable).parent
LENIENT = "name: lenient\nmin_items: 1\ntolerances:\n  top1_agreement: {direction: higher_is_better, tolerance: 1.0}\n"
TINY_ENV = {"QP_CALIBRATION_SAMPLES": "8", "QP_SEQ_LEN": "64", "QP_EVAL_LIMIT": "4", "QP_EVAL_MAX_NEW_TOKENS": "16"}


def free_port() -> int:
    """A port nobody listens on right now: bind port 0 on loopback and let the OS pick."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make install` (as root it installs postgresql)")
    return found[-1]


def _as_owner(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def running_postgres(databases: tuple[str, ...] = ("dagster", "mlflow")) -> Iterator[dict[str, str]]:
    """A fresh cluster on a free loopback port with the named databases; yields each one's SQLAlchemy URL (user
    `postgres`, trust on loopback). PostgreSQL refuses to run as root: under root the cluster belongs to the
    `postgres` user Debian's package creates, in a folder outside root-only temporary trees."""
    root = Path(tempfile.mkdtemp(prefix="qp-postgres-", dir="/tmp"))
    data, port = root / "data", free_port()
    with _sigterm_exits():
        try:
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                os.chown(root, owner.pw_uid, owner.pw_gid)
            initdb = [_pg_binary("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
            subprocess.run(_as_owner([*initdb, "--no-sync"]), check=True, capture_output=True)
            options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
            log = str(root / "server.log")
            subprocess.run(
                _as_owner([_pg_binary("pg_ctl"), "-D", str(data), "-l", log, "-o", options, "-w", "start"]),
                check=True, capture_output=True,
            )  # fmt: skip
            for db in databases:
                createdb = [_pg_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db]
                subprocess.run(createdb, check=True, capture_output=True)
            yield {db: f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{db}" for db in databases}
        finally:
            if (data / "postmaster.pid").exists():  # started: stop it, whatever ended the block
                stop = [_pg_binary("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]
                subprocess.run(_as_owner(stop), capture_output=True)
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Within: SIGTERM exits through Python's `finally` blocks (SystemExit 143) instead of killing the process where
    it stands. A cluster is a server of its own, started detached: a `make bench-deploy` or a test run stopped with
    SIGTERM (a CI timeout, `kill`) left it running, its port taken and its folder in /tmp. Only the main thread may
    set a handler; elsewhere nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_143(signum, frame) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_143)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, log: Path) -> Iterator[str]:
    """`mlflow server` on PostgreSQL with proxied artifacts, on loopback; yields its URI once it answers."""
    port = free_port()
    cmd = [str(BIN_DIR / "mlflow"), "server", "--backend-store-uri", backend, "--serve-artifacts",
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        uri, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=5).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: see {log}") from None
                time.sleep(1)
        yield uri
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)


def tiny_models(out: Path, count: int) -> list[Path]:
    """`count` tiny random Llamas (seeds 0..) with the tiny tokenizer, as the tests build them (models/tiny.py)."""
    from quant_pipeline.models.tiny import smollm2_tiny_tokenizer, write_tiny_llama

    tokenizer = smollm2_tiny_tokenizer()
    return [write_tiny_llama(out / f"tiny-{seed}", tokenizer, seed=seed) for seed in range(count)]


def audits(env: dict, models: list[Path], logs: Path) -> float:
    """Audit the models at once, one `quant-pipeline audit` process each; wall seconds until the last ends."""
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [str(BIN_DIR / "quant-pipeline"), "audit", "--model", str(m)],
            env=env,
            stdout=open(logs / f"{m.name}.log", "w"),
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for m in models
    ]
    codes = [p.wait() for p in procs]
    if any(c not in (0, 3) for c in codes):
        raise RuntimeError(f"an audit did not complete (exit codes {codes}): see {logs}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="quant_pipeline.cli.bench_deploy", description=__doc__.splitlines()[0]).parse_args(
        argv
    )
    work = Path(tempfile.mkdtemp(prefix="qp-bench-deploy-"))
    (work / "policy.yaml").write_text(LENIENT)
    models = tiny_models(work, 2)
    base = {**os.environ, **TINY_ENV, "QP_POLICY_FILE": str(work / "policy.yaml"),
            "QP_CALIBRATION_FILE": str(DEFAULT_CALIBRATION)}  # fmt: skip

    def home(name: str, instance_yaml: Path, **extra: str) -> dict:
        (work / name / "dagster").mkdir(parents=True)
        shutil.copy(instance_yaml, work / name / "dagster" / "dagster.yaml")
        return {
            **base,
            "DAGSTER_HOME": str(work / name / "dagster"),
            "QP_STORE_DIR": str(work / name / "store"),
            **extra,
        }

    sqlite = home("sqlite", PACKAGE_DIR.parent / "dagster.yaml", QP_MLFLOW_TRACKING_URI=f"sqlite:///{work}/sqlite/m.db")
    rows = [("SQLite (embedded defaults), 1 audit", audits(sqlite, models[:1], work / "sqlite"), 1)]
    t0 = time.perf_counter()
    with running_postgres() as urls, mlflow_server(urls["mlflow"], work / "mlartifacts", work / "mlflow.log") as uri:
        setup = time.perf_counter() - t0
        for label, chosen in (("1 audit", models[:1]), ("2 audits at once", models)):
            name = f"pg-{len(chosen)}"
            env = home(name, PACKAGE_DIR / "deploy" / "dagster.postgres.yaml", QP_DAGSTER_POSTGRES_URL=urls["dagster"],
                       QP_MAX_CONCURRENT_RUNS="2", QP_MLFLOW_TRACKING_URI=uri,
                       QP_TRAIL_LOCK_URL=urls["dagster"])  # fmt: skip
            if len(chosen) == 1:  # a model's own experiment and registry, apart from the parallel pair's
                env["QP_MODEL_NAME"] = "bench-single"
            rows.append((f"PostgreSQL + MLflow server, {label}", audits(env, chosen, work / name), len(chosen)))
    print(f"\nservers' start (PostgreSQL cluster + MLflow server on it): {setup:.1f} s\n")
    print("| setup | wall s | audits per hour |\n|---|---:|---:|")
    for label, seconds, n in rows:
        print(f"| {label} | {seconds:.1f} | {n * 3600 / seconds:.0f} |")
    print(f"\nserver setup's overhead on one audit: {rows[1][1] / rows[0][1]:.2f}x SQLite's wall time; "
          f"two at once: {rows[2][2] * rows[1][1] / rows[2][1]:.2f}x the throughput of one")  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
