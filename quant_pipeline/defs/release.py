"""The release record: the model's audit report (every release event so far) and the artifact's ML-BOM."""

import dagster as dg

from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import CANDIDATES
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.release.registry import write_bom
from quant_pipeline.release.report import write_report


@dg.asset(group_name="audit", kinds={"html"}, deps=["approval", "candidate_tradeoff"], partitions_def=CANDIDATES)
def audit_report(
    context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, quantized_artifact: dict
) -> dg.MaterializeResult:
    """Every release event of this model so far, refreshed after each audit, and this candidate's ML-BOM."""
    model_name = quantized_artifact["model_name"]
    md_path, html_path = write_report(settings.store, mlflow, model_name)
    bom_path = write_bom(settings.store, quantized_artifact["artifact_id"])
    with mlflow.stage_run(
        model_name,
        "audit_report",
        {"dagster_run_id": context.run.run_id, "artifact_id": quantized_artifact["artifact_id"]},
    ) as run:
        for path in (md_path, html_path, bom_path):
            run.log_file(path)
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(md_path.read_text()[:60000]),
            "html": dg.MetadataValue.path(str(html_path)),
            "mlbom": dg.MetadataValue.path(str(bom_path)),
            **run.metadata(),
        },
    )
