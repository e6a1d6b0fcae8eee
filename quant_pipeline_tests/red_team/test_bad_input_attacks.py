"""Red team: the inputs a person really hands the audit by mistake, and how the CLI must answer.

Each bad input is refused through `quant-pipeline audit` itself: exit 2, exactly one line on stderr
naming the file or setting and the fix, no traceback, nothing written to the store or registry.
A completed audit whose gate refuses the artifact is a verdict (exit 3), not a crash (exit 1).
"""

import gzip
import shutil
from pathlib import Path

import dagster as dg
import pytest

from quant_pipeline.cli import main
from quant_pipeline.cli.audit import AUDIT_CONSOLE, audit_outcome
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.release.evidence import EvidenceError
from quant_pipeline.release.governing import PolicyNotPinnedError
from quant_pipeline_tests.support import mlflow_db

JSONL = b'{"text": "a calibration sample"}\n'
NOT_TEXT = {
    "png-saved-as-jsonl": JSONL + b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
    "gzipped-jsonl": gzip.compress(JSONL * 20),
    "utf16-jsonl": (JSONL * 20).decode().encode("utf-16"),
    "nul-padded-text": JSONL * 3 + b"\x00" * 64,
}
ALWAYS_FAILS = (
    "name: always-fails\nmin_items: 1\ntolerances:\n"
    "  kl_divergence: {direction: lower_is_better, mode: absolute, tolerance: 0.0}\n"
)


@pytest.fixture
def cli_home(tmp_path, monkeypatch) -> Path:
    """An empty store, MLflow registry and Dagster home, as a fresh clone has them."""
    for name in ("QP_MODEL", "QP_CALIBRATION_FILE", "QP_POLICY_FILE", "QP_EVAL_LIMIT", "QP_CALIBRATION_SAMPLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("QP_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", mlflow_db(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    monkeypatch.setenv("QP_EVAL_MAX_NEW_TOKENS", "16")
    return tmp_path


def assert_refused(capsys, home: Path, argv: list[str], *named: str) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert err.startswith("quant-pipeline: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    for thing in named:
        assert thing in err, err
    store = home / "store"
    assert not store.exists() or not any(store.rglob("*")), sorted(store.rglob("*"))
    assert not (home / "dagster").exists()  # no run was started
    assert MlflowTracker().client().search_registered_models() == []
    return err


def tiny_audit(model: Path, *extra: str) -> list[str]:
    return ["audit", "--model", str(model), "--calibration-samples", "8", "--eval-limit", "4", *extra]


@pytest.mark.parametrize("kind", sorted(NOT_TEXT))
def test_a_calibration_file_that_is_not_text_is_refused_by_name(cli_home, capsys, tiny_llama, kind):
    calibration = cli_home / f"{kind}.jsonl"
    calibration.write_bytes(NOT_TEXT[kind])
    err = assert_refused(capsys, cli_home, tiny_audit(tiny_llama, "--calibration-file", str(calibration)), "UTF-8")
    assert f"{calibration}:" in err and "not UTF-8 text" in err and "convert" in err
    if kind in ("png-saved-as-jsonl", "nul-padded-text"):
        assert f"{calibration}:{2 if kind.startswith('png') else 4}:" in err  # the line with the first bad byte


@pytest.mark.parametrize("cut", ["half-copied", "header-cut"])
def test_a_truncated_model_safetensors_is_refused_by_name(cli_home, capsys, tiny_llama, cut):
    copy = Path(shutil.copytree(tiny_llama, cli_home / "tiny_copy"))
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2 if cut == "half-copied" else 100)
    err = assert_refused(capsys, cli_home, tiny_audit(copy), str(weights), "cannot be read", "save_pretrained")
    assert "truncated" in err


def test_a_weights_file_that_is_not_safetensors_is_refused(cli_home, capsys, tiny_llama):
    copy = Path(shutil.copytree(tiny_llama, cli_home / "tiny_copy"))
    (copy / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\n")
    assert_refused(capsys, cli_home, tiny_audit(copy), str(copy / "model.safetensors"), "not safetensors")


@pytest.mark.parametrize(
    ("option", "setting"),
    [("--eval-limit", "eval_limit"), ("--eval-max-new-tokens", "eval_max_new_tokens")],
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_an_eval_size_below_one_is_refused_by_name(cli_home, capsys, tiny_llama, option, setting, value):
    err = assert_refused(capsys, cli_home, [*tiny_audit(tiny_llama), option, value], f"{setting}={value}", option)
    assert "at least 1" in err


# The exit code of a finished run, on a toy graph shaped like the gate (seconds, no model work).


def gate_graph(verdict: str = "PASS", crash: Exception | None = None):
    @dg.asset
    def quantized_artifact() -> int:
        if crash is not None:
            raise crash
        return 1

    @dg.asset
    def delta_report(quantized_artifact: int) -> dg.MaterializeResult:
        failed, incomplete = (3 if verdict == "FAIL" else 0), (2 if verdict == "INCOMPLETE" else 0)
        metadata = {"verdict": verdict, "slices": 4, "slices_failed": failed, "slices_incomplete": incomplete}
        return dg.MaterializeResult(
            value={"passed": verdict == "PASS"}, metadata={**metadata, "html_report": dg.MetadataValue.path("/r.html")}
        )

    @dg.asset_check(asset=delta_report)
    def slices_within_tolerance(delta_report: dict) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=delta_report["passed"])

    @dg.asset(deps=[delta_report])
    def approval() -> dg.MaterializeResult:
        decision = {"PASS": "pending sign-off", "FAIL": "rejected by the gate"}.get(verdict, "incomplete")
        return dg.MaterializeResult(metadata={"decision": decision})

    return [quantized_artifact, delta_report, approval, slices_within_tolerance]


def run_graph(graph, tmp_path):
    """Run the toy graph the way `run_audit` runs the real one: as an asset job with the CLI's console logger."""
    defs = dg.Definitions(jobs=[dg.define_asset_job("gate")], assets=graph, loggers={"console": AUDIT_CONSOLE})
    run_config = {"loggers": {"console": {"config": {"log_level": "DEBUG"}}}}
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        return defs.resolve_job_def("gate").execute_in_process(
            instance=instance, run_config=run_config, raise_on_error=False
        )


def test_a_passing_gate_exits_0_with_a_pass_verdict(tmp_path):
    outcome = audit_outcome(run_graph(gate_graph(), tmp_path))
    assert (outcome.code, outcome.error) == (0, "")
    assert outcome.verdict == (
        "verdict: PASS — 4/4 gated slices within tolerance or waived, 0 regressed, 0 could not show a regression; "
        "decision: pending sign-off\nreport: /r.html"
    )


@pytest.mark.parametrize(
    ("verdict", "found", "decision"),
    [
        ("FAIL", "1/4 gated slices within tolerance or waived, 3 regressed", "rejected by the gate"),
        ("INCOMPLETE", "2/4 gated slices within tolerance or waived, 0 regressed, 2 could not", "incomplete"),
    ],
)
def test_a_fail_or_incomplete_verdict_completes_the_run_and_exits_3(tmp_path, capsys, verdict, found, decision):
    result = run_graph(gate_graph(verdict), tmp_path)
    err = capsys.readouterr().err
    assert result.success  # the check failed, the run did not: approval recorded the gate's decision
    outcome = audit_outcome(result)
    assert (outcome.code, outcome.error) == (3, "")
    assert outcome.verdict.startswith(f"verdict: {verdict} — {found}")
    assert f"decision: {decision}\nreport: /r.html" in outcome.verdict
    assert "Stack Trace" not in err and "Traceback" not in err


def test_a_crashed_stage_exits_1_naming_the_stage_and_the_run(tmp_path, capsys):
    result = run_graph(gate_graph(crash=RuntimeError("out of memory\nsecond line")), tmp_path)
    assert "Stack Trace" in capsys.readouterr().err  # a real crash keeps its trace in the log
    outcome = audit_outcome(result)
    assert outcome.code == 1 and outcome.verdict.startswith("verdict: none")
    assert "\n" not in outcome.error
    assert "stage quantized_artifact failed (RuntimeError: out of memory)" in outcome.error
    assert result.run_id in outcome.error


@pytest.mark.parametrize("error", [AuditInputError, PolicyNotPinnedError, EvidenceError])
def test_bad_input_found_inside_a_stage_exits_2_with_its_own_line_and_no_trace(tmp_path, capsys, error):
    result = run_graph(gate_graph(crash=error("kept baseline /x was modified")), tmp_path)
    assert "Stack Trace" not in capsys.readouterr().err
    outcome = audit_outcome(result)
    assert (outcome.code, outcome.error) == (2, "kept baseline /x was modified")


# One real audit: the tiny model against a policy it cannot meet (about a minute).


def test_a_completed_audit_with_a_failing_gate_exits_3_with_the_verdict(cli_home, capfd, tiny_llama):
    policy = cli_home / "always-fails.yaml"
    policy.write_text(ALWAYS_FAILS)
    code = main(tiny_audit(tiny_llama, "--policy-file", str(policy)))
    out, err = capfd.readouterr()
    assert code == 3, err[-3000:]
    lines = out.rstrip("\n").splitlines()
    assert lines[-2].startswith("verdict: FAIL — ") and "decision: rejected by the gate" in lines[-2]
    assert lines[-1].startswith("report: ")  # the summary ends with the verdict and where the report is
    report = Path(lines[-1].removeprefix("report: "))
    assert report.name == "delta_report.html" and report.is_file()
    assert "Traceback" not in out + err and "Stack Trace" not in err
    assert "quant-pipeline: error" not in err
