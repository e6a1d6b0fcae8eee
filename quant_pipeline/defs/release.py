"""The release record: the model's audit report (every release event so far) and its candidates' ML-BOMs."""

import dagster as dg

from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import MODELS, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.release.registry import write_bom
from quant_pipeline.release.report import write_report


@dg.asset(group_name="audit", kinds={"html"}, partitions_def=MODELS)
def audit_report(
    context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, candidate_tradeoff: dict
) -> dg.MaterializeResult:
    """Every release event of this model so far (with the candidates side by side), refreshed after each
    comparison, and the ML-BOM of each candidate's current artifact."""
    model_name = candidate_tradeoff["model_name"]
    with StageMeter() as meter:
        md_path, html_path = write_report(settings.store, mlflow, model_name)
        boms = [write_bom(settings.store, aid) for aid in candidate_tradeoff["artifacts"]]
    with stage_run(context, mlflow, meter, model_name, "audit_report") as run:
        run.log_metrics(meter.metadata())
        for path in (md_path, html_path, *boms):
            run.log_file(path)
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.md(md_path.read_text()[:60000]),
            "html": dg.MetadataValue.path(str(html_path)),
            "html_url": dg.MetadataValue.url(html_path.resolve().as_uri()),
            "mlbom": dg.MetadataValue.json([str(p) for p in boms]),
            **meter.metadata(),
            **run.metadata(),
        },
    )
