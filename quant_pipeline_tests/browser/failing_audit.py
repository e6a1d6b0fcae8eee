"""The failing audit every browser test looks at: its policy, its run, and the summary a test reads back.

FAIL on purpose (a policy no quantization can meet), so every page must show a failure and its values.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from quant_pipeline_tests.servers import REPO_ROOT
from quant_pipeline_tests.support import fresh_audit_world, mlflow_db, run_audit

# kl_divergence is > 0 for any quantization that changes a weight: tolerance 0 fails every slice it measures, so
# the verdict is FAIL whatever else happens. top1_agreement's 0.025 is there to be found on a page: a number no
# other cell of the failing row shows (not as part of another number either), which the tiny model's 4-bit
# artifact misses on the arithmetic slice (delta -0.038) and meets on the others (-0.023 at worst, 2026-11-27).
POLICY_NAME = "browser-fails"
FAILING_POLICY = (
    f"name: {POLICY_NAME}\nmin_items: 1\ntolerances:\n"
    "  kl_divergence: {direction: lower_is_better, mode: absolute, tolerance: 0.0}\n"
    "  top1_agreement: {direction: higher_is_better, mode: absolute, tolerance: 0.025}\n"
)
TOP1_TOLERANCE = "0.025"  # how top1_agreement's tolerance reads on a page, whatever the digits after it


@dataclass(frozen=True)
class FailedAudit:
    """What the browser tests need of the shared failing audit (all of it JSON, so a worker can read it back)."""

    root: str  # store, MLflow database and artifacts, Dagster home, policy and calibration all lie under it
    model: str  # the tiny model's checkpoint folder (QP_MODEL)
    model_name: str
    artifact_id: str
    content_hash: str  # the artifact's sha256 tree hash, in full
    registry_version: str
    verdict: str
    failing: list  # [{category, metric}] from the delta_report record
    delta_html: str
    audit_html: str

    @property
    def dagster_home(self) -> Path:
        return Path(self.root) / "dagster"

    @property
    def settings_env(self) -> dict:
        """The environment a server sees: this audit's settings (the ones `make ui` reads), nothing of the checkout."""
        root = Path(self.root)
        return {
            **os.environ,
            "DAGSTER_HOME": str(self.dagster_home), "QP_MODEL": self.model,
            "QP_CALIBRATION_FILE": str(root / "calibration.jsonl"), "QP_POLICY_FILE": str(root / "policy.yaml"),
            "QP_STORE_DIR": str(root / "store"), "QP_MLFLOW_TRACKING_URI": mlflow_db(root),
            "QP_CALIBRATION_SAMPLES": "8", "QP_SEQ_LEN": "64", "QP_EVAL_LIMIT": "4", "QP_REAUDIT_SCHEDULE": "off",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        }  # fmt: skip


def run_failing_audit(root: Path, tiny_llama: Path) -> FailedAudit:
    settings, tracker = fresh_audit_world(root, tiny_llama)
    (root / "policy.yaml").write_text(FAILING_POLICY)
    shutil.copy(REPO_ROOT / "dagster.yaml", root / "dagster" / "dagster.yaml")
    # the instance a server with DAGSTER_HOME=root/dagster reads: the same dagster.yaml, the same storage
    with dg.DagsterInstance.from_config(str(root / "dagster")) as instance:
        result = run_audit(settings, tracker, instance, approver="Ada Reviewer", note="browser check")
    assert result.success, "the failing audit must complete (a FAIL is a verdict, not a crash)"
    report, artifact = result.output_for_node("delta_report"), result.output_for_node("quantized_artifact")
    assert report["verdict"] == "FAIL" and report["failing"], report
    assert {f["metric"] for f in report["failing"]} == {"kl_divergence", "top1_agreement"}, report["failing"]
    # the per-model report where the audit_report asset says it wrote it (its `html` metadata)
    written = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("audit_report")]
    assert written, "the audit_report asset was not materialized"
    audit_html = Path(written[-1].materialization.metadata["html"].value)
    assert audit_html.is_file(), audit_html
    return FailedAudit(
        root=str(root), model=str(tiny_llama), model_name=artifact["model_name"], artifact_id=artifact["artifact_id"],
        content_hash=artifact["content_hash"], registry_version=str(artifact["registry_version"]),
        verdict=report["verdict"],
        failing=[{"category": f["category"], "metric": f["metric"]} for f in report["failing"]],
        delta_html=report["html_path"], audit_html=str(audit_html),
    )  # fmt: skip
