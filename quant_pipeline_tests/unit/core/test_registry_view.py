"""The registry view reads what MLflow's own client reads, from the same SQLite registry, and never writes it."""

import shutil
import sqlite3
import subprocess
import sys

import pytest

from quant_pipeline.core.registry_view import RegistryView
from quant_pipeline.core.store import StoreError
from quant_pipeline.core.tracking import MlflowTracker

MODEL = "tiny-model"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real MLflow registry with the shapes the pipeline writes: tagged model, versions with artifact IDs,
    aliases, a version deleted after registration, a second model, and an artifact registered twice."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    tracker = MlflowTracker(tracking_uri=uri)
    tracker.set_model_tags(MODEL, {"trail_head": "ab" * 32, "trail_length": 7})
    client = tracker.client()
    for i, aid in enumerate(["gptq-a", "gptq-b", "gptq-gone", "gptq-a"]):
        mv = client.create_model_version(MODEL, source=f"/tmp/src{i}", tags={"artifact_id": aid, "n": str(i)})
        if aid == "gptq-gone":
            client.delete_model_version(MODEL, mv.version)
    tracker.set_alias(MODEL, "approved", "2")
    tracker.set_alias(MODEL, "production", "2")
    tracker.set_model_tags("other-model", {"trail_head": "cd" * 32})
    client.create_model_version("other-model", source="/tmp/o", tags={"artifact_id": "gptq-b"})
    return uri, tracker


def test_the_view_opens_the_registry_the_installed_mlflow_creates(registry):
    """Fails when an MLflow upgrade migrates the schema: re-check the tables, then add the revision."""
    assert isinstance(RegistryView.of(registry[0]), RegistryView)


@pytest.mark.parametrize("name", [MODEL, "other-model", "never-registered"])
def test_model_tags_match_mlflow(registry, name):
    uri, tracker = registry
    assert RegistryView.of(uri).model_tags(name) == tracker.model_tags(name)


@pytest.mark.parametrize(
    ("name", "artifact_id"),
    [(MODEL, "gptq-a"), (MODEL, "gptq-b"), (MODEL, "gptq-gone"), (MODEL, "nothing"), ("other-model", "gptq-b")],
)
def test_versions_their_tags_and_aliases_match_mlflow(registry, name, artifact_id):
    uri, tracker = registry
    mine, theirs = RegistryView.of(uri).model_version(name, artifact_id), tracker.model_version(name, artifact_id)
    if theirs is None:
        assert mine is None
        return
    theirs = tracker.client().get_model_version(name, theirs.version)  # MLflow's own read, not our wrapper's
    assert (mine.version, mine.tags, sorted(mine.aliases)) == (str(theirs.version), theirs.tags, sorted(theirs.aliases))


def test_a_deleted_version_is_not_found_and_a_re_registered_artifact_gives_mlflows_pick(registry):
    view = RegistryView.of(registry[0])
    assert view.find_version(MODEL, "gptq-gone") is None
    assert view.find_version(MODEL, "gptq-a") == "4"  # the newest, as MLflow's search orders them


def test_an_unknown_schema_or_another_store_falls_back_to_mlflow(registry, tmp_path):
    uri, _ = registry
    copy = tmp_path / "mlflow.db"
    shutil.copy(uri.removeprefix("sqlite:///"), copy)
    with sqlite3.connect(copy) as con:
        con.execute("UPDATE alembic_version SET version_num = 'from-the-future'")
    for other in (f"sqlite:///{copy}", f"sqlite:///{tmp_path / 'absent.db'}", "http://127.0.0.1:1"):
        assert RegistryView.of(other) is None, other


def test_the_view_cannot_write_the_registry(registry):
    view = RegistryView.of(registry[0])
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        view._connect().execute("DELETE FROM registered_model_tags")
    assert view.model_tags(MODEL)["trail_length"] == "7"


def test_a_name_from_the_command_line_is_checked_before_any_query(registry):
    with pytest.raises(StoreError, match="model name"):
        RegistryView.of(registry[0]).model_tags("x' OR name LIKE '%")


def test_read_only_verbs_answer_without_importing_mlflow_or_dagster(registry, tmp_path):
    uri, _ = registry
    code = (
        "import sys; from quant_pipeline.cli import main; code = main(['verify-trail', 'tiny-model']); "
        "print('LOADED', sorted(m for m in ('mlflow', 'dagster', 'torch', 'pandas') if m in sys.modules))"
    )
    env = {"QP_MLFLOW_TRACKING_URI": uri, "QP_STORE_DIR": str(tmp_path / "store"), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert "trail file is missing but MLflow anchors 7 entries" in out.stdout, out.stdout + out.stderr
    assert "LOADED []" in out.stdout, out.stdout
