"""`quant-pipeline` as a person types it: exit codes mean something, refusals are one line on stderr,
and no name from the command line reaches a path or an MLflow filter unchecked."""

import os
import subprocess
import sys
import time

import pytest

from quant_pipeline.cli import main
from quant_pipeline_tests.support import cli_home

UNSAFE = ["../trail", "..", "a/b", "x' OR name LIKE '%", "/etc/passwd"]
VERBS = {
    "show": lambda n: ["show", n],
    "verify": lambda n: ["verify", n],
    "approve": lambda n: ["approve", n, "--by", "Ada", "--note", "ok"],
    "reject": lambda n: ["reject", n, "--by", "Ada", "--note", "no"],
    "promote": lambda n: ["promote", n, "--by", "Ada"],
    "bom": lambda n: ["bom", n],
    "rollback": lambda n: ["rollback", n, "--by", "Ada", "--note", "bad"],
    "verify-trail": lambda n: ["verify-trail", n],
    "audit-report": lambda n: ["audit-report", n],
    "pull": lambda n: ["pull", n],
    "delete-base": lambda n: ["delete-base", n],
    "audit --model-name": lambda n: ["audit", "--model-name", n],
    "serve --model-name": lambda n: ["serve", "--model-name", n, "--prompt", "hi"],
    "serve --ref": lambda n: ["serve", "--model-name", "m", "--ref", n, "--prompt", "hi"],
    "reproduce --model-name": lambda n: ["reproduce", "some-request", "--model-name", n],
}


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    """An empty store and MLflow registry, as a fresh clone has them."""
    home = tmp_path_factory.mktemp("cli")
    with cli_home(home):
        yield home


@pytest.mark.parametrize("name", UNSAFE)
@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_refuses_a_traversal_name_in_one_line(cli_env, capsys, verb, name):
    trail = cli_env / "store" / "trail" / "victim.jsonl"
    trail.parent.mkdir(parents=True, exist_ok=True)
    trail.write_text("{}\n")
    code = main(VERBS[verb](name))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("quant-pipeline: error: ") and err.count("\n") == 1, err
    assert trail.exists()  # `delete-base ../trail` once deleted the audit trail


def test_an_unknown_artifact_is_bad_input_not_a_crash(cli_env, capsys):
    assert main(["show", "gptq-w4g64-000000000000"]) == 2
    err = capsys.readouterr().err
    assert "no artifact gptq-w4g64-000000000000" in err and "Traceback" not in err


def test_a_missing_model_stops_the_audit_before_any_work(cli_env, capsys):
    assert main(["audit", "--model", str(cli_env / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and err.count("\n") == 1
    assert not (cli_env / "store" / "artifacts").exists()


def test_usage_errors_exit_2_and_help_exits_0(capsys):
    with pytest.raises(SystemExit) as usage:
        main(["approve"])
    assert usage.value.code == 2 and "required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as helped:
        main(["--help"])
    assert helped.value.code == 0 and "audit" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argument", "named"),
    [
        ("gptq", "write it as 'gptq-w4-g64'"),
        ("awq-w4", "no known method starts it"),
        ("torchao-int8-weight-w4", "'w4' is not a setting of torchao-int8-weight"),
        ("identity-xv_proj", "'xv_proj' is not a setting of identity"),
        ("torchao-int8-weight-xv_proj.down_proj", "sorted, `.`-joined"),
        ("", "--candidates is empty"),
    ],
)
def test_a_candidate_key_that_names_no_recipe_is_refused_before_any_work(cli_env, capsys, argument, named):
    assert main(["audit", "--candidates", argument]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1, err
    assert not (cli_env / "store" / "artifacts").exists()


def test_candidates_and_a_single_recipe_or_an_approver_do_not_mix(capsys):
    with pytest.raises(SystemExit) as usage:
        main(["audit", "--candidates", "all", "--approver", "Ada"])
    assert usage.value.code == 2 and "signed off afterwards" in capsys.readouterr().err


@pytest.mark.parametrize("verb", [["verify-trail", "tiny"], ["pull", "tiny"]])
def test_a_tracking_server_that_does_not_answer_is_one_line_and_exit_2_within_seconds(tmp_path, verb):
    """MLflow's own retries (7, with backoff) took 4 min 17 s and ended in a traceback."""
    from quant_pipeline_tests.servers import free_port

    port = free_port()
    env = {**os.environ, "QP_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}", "QP_STORE_DIR": str(tmp_path)}
    env.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "quant_pipeline.cli", *verb], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        f"quant-pipeline: error: cannot reach the MLflow tracking server at http://127.0.0.1:{port} (connection "
        "refused): start it, or point QP_MLFLOW_TRACKING_URI at the server the pipeline records to"
    ]
    assert time.monotonic() - started < 60
