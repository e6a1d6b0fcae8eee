"""Models and candidates as Dagster partitions, and the three runs an audit takes.

A model's own stages (base checkpoint, calibration set, base evaluation) and the comparison of its
candidates (tradeoff, audit report) are partitioned by model; a candidate's stages (quantized artifact, its
evaluation, the gate, the approval) by model x candidate. So each model and each of its candidates keeps its
own history, staleness and runs in the UI, and the base evaluation is shared by every candidate of its model.

Dagster runs one partitions definition per run, so an audit is three runs, in this order: the model stages,
then each candidate's stages, then the comparison (`phases`). The CLI runs them one after another and stops at
the first that fails; a re-audit's sensor requests the model's run, and once that succeeds `next_phases_sensor`
requests the candidates' runs and the comparison together, which the run queue (one run at a time:
`dagster.yaml`) runs in that order.

A model key is the model as `settings.model` names it (`default`, a checkpoint folder, a .gguf file, a hub
id); a candidate key is a recipe written out (`gptq-w4-g64`, `torchao-int8-weight`: `core.recipe`). Either is
added in the UI ("Add partition") or by `quant-pipeline audit --model ... --candidates ...`, with no code and
no file; a key that names no model or recipe fails the run's preflight in one line.
"""

from pathlib import Path

import dagster as dg

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe, candidate_key, recipe_from_key

MODELS = dg.DynamicPartitionsDefinition(name="model")
CANDIDATES = dg.DynamicPartitionsDefinition(name="candidate")
AUDITS = dg.MultiPartitionsDefinition({"model": MODELS, "candidate": CANDIDATES})
PARTITION_TAG = "dagster/partition"
MODEL_TAG = "dagster/partition/model"
CANDIDATE_TAG = "dagster/partition/candidate"
AFTER_RUN_TAG = "quant_pipeline/after_run"  # a re-audit's later phases: the model run they follow

MODEL_STAGES = ["base_checkpoint", "calibration_set", "runtime_environment", "base_eval_results"]
CANDIDATE_STAGES = ["quantized_artifact", "quantized_eval_results", "delta_report", "approval"]
COMPARISON_STAGES = ["candidate_tradeoff", "audit_report"]
PHASES = {"model": MODEL_STAGES, "candidate": CANDIDATE_STAGES, "comparison": COMPARISON_STAGES}

model_stages_job = dg.define_asset_job(
    "model_stages", selection=MODEL_STAGES, partitions_def=MODELS,
    description="A model's own stages: base checkpoint, calibration set, runtime, base evaluation.",
)  # fmt: skip
candidate_stages_job = dg.define_asset_job(
    "candidate_stages", selection=CANDIDATE_STAGES, partitions_def=AUDITS,
    description="One candidate of one model: quantized artifact, its evaluation, the gate, the approval.",
)  # fmt: skip
comparison_job = dg.define_asset_job(
    "comparison", selection=COMPARISON_STAGES, partitions_def=MODELS,
    description="Every candidate of a model side by side, the recommendation and the audit report.",
)  # fmt: skip
PHASE_JOBS = {"model": model_stages_job, "candidate": candidate_stages_job, "comparison": comparison_job}


def phases(selection: list[str] | None) -> list[tuple[str, list[str]]]:
    """The runs a selection of stages (None: all) takes, in order, each with its share of the selection."""
    chosen = None if selection is None else {str(s) for s in selection}
    split = [(phase, [s for s in stages if chosen is None or s in chosen]) for phase, stages in PHASES.items()]
    return [(phase, stages) for phase, stages in split if stages]


def model_key(model: str) -> str:
    """The partition key of a model setting: an existing path made absolute (one key per folder or file)."""
    if any(c in model for c in "|,[]"):
        raise AuditInputError(f"model {model!r}: a model key cannot contain | , [ or ]: rename the folder or file")
    return str(Path(model).resolve()) if Path(model).exists() else model


def partition(phase: str, model: str, recipe: Recipe) -> str | dg.MultiPartitionKey:
    """The partition key of a phase's run: the model's, or (candidate phase) the model x candidate key."""
    if phase == "candidate":
        return dg.MultiPartitionKey({"model": model, "candidate": candidate_key(recipe)})
    return model


def register(instance: dg.DagsterInstance, model: str, recipe: Recipe | None = None) -> str:
    """Add the model's partition and the recipe's (each once); returns the model key."""
    key = model_key(model)
    if not instance.has_dynamic_partition(MODELS.name, key):
        instance.add_dynamic_partitions(MODELS.name, [key])
    if recipe is not None:
        recipe.validate_values()
        if not instance.has_dynamic_partition(CANDIDATES.name, candidate_key(recipe)):
            instance.add_dynamic_partitions(CANDIDATES.name, [candidate_key(recipe)])
    return key


def latest_metadata(instance: dg.DagsterInstance, asset: str, key: str, partition: str | None = None):
    """A metadata value of the asset's latest materialization (of one partition, if named)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None),
        limit=1,
    ).records
    if not records:
        return None
    value = records[0].asset_materialization.metadata.get(key)
    return getattr(value, "value", value)


def context_model(context: dg.AssetExecutionContext) -> str:
    """The model key of the partition a stage runs for."""
    key = context.partition_key
    return key.keys_by_dimension["model"] if isinstance(key, dg.MultiPartitionKey) else key


def audit_key(context: dg.AssetExecutionContext) -> str:
    """The key that groups one audit's MLflow stage runs under one parent run: the ID of the Dagster run of the
    model's own stages that the audit starts with.

    An audit is several Dagster runs (`phases`) that share no tag of their own: the CLI tags each phase alike,
    and a re-audit's later phases carry `quant_pipeline/after_run` = the model run's ID (`next_phases_sensor`).
    So a model stage's key is its own run's ID; a later phase's is that tag, or else the run that last
    materialized one of the model's partitioned stages: the base this candidate is judged against, which the
    CLI (and a launch from the UI after the model's run) built just before. Model + candidate would not do: it
    would pile every re-audit of a candidate under one parent, and split one audit's candidates from the base."""
    if context.run.tags.get(AFTER_RUN_TAG):
        return context.run.tags[AFTER_RUN_TAG]
    if context.asset_key.to_user_string() in MODEL_STAGES:
        return context.run.run_id
    model = context_model(context)
    latest = [
        record
        for stage in MODEL_STAGES
        if stage != "runtime_environment"  # not partitioned by model
        for record in context.instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(stage), asset_partitions=[model]), limit=1
        ).records
    ]
    return max(latest, key=lambda r: r.timestamp).run_id if latest else context.run.run_id


def stage_run(context: dg.AssetExecutionContext, mlflow, meter, model_name: str, stage: str, **tags):
    """The stage's MLflow run, as every stage opens it: tagged with its Dagster run, started when the stage
    started (`meter`: its StageMeter), nested under its audit's parent run (`audit_key`)."""
    return mlflow.stage_run(
        model_name, stage, {"dagster_run_id": context.run.run_id, **tags}, started=meter.started,
        audit_key=audit_key(context),
    )  # fmt: skip


def candidate_recipe(context: dg.AssetExecutionContext) -> Recipe:
    """The recipe of the candidate partition a stage runs for."""
    return recipe_from_key(context.partition_key.keys_by_dimension["candidate"])


def run_partition(run: dg.DagsterRun | None) -> tuple[str | None, Recipe | None]:
    """The model key and the recipe of a run's partition (None where the run has none)."""
    tags = (run.tags or {}) if run is not None else {}
    candidate = tags.get(CANDIDATE_TAG)
    model = tags.get(MODEL_TAG) or (None if candidate or PARTITION_TAG not in tags else tags[PARTITION_TAG])
    return model, recipe_from_key(candidate) if candidate else None


def audited(instance: dg.DagsterInstance, calibrated_only: bool = False) -> dict[str, list[str]]:
    """Per model, the candidates that have an artifact (those whose method reads the calibration set, if
    asked): what a re-audit re-audits. Candidates never audited for a model are not audited by a trigger."""
    pairs: dict[str, list[str]] = {}
    for text in sorted(instance.get_materialized_partitions(dg.AssetKey("quantized_artifact"))):
        if "|" not in text:  # a candidate-only key, from before models were partitions: re-audit it to count
            continue
        key = AUDITS.get_partition_key_from_str(text)
        model, candidate = key.keys_by_dimension["model"], key.keys_by_dimension["candidate"]
        if not calibrated_only or _calibrated(candidate):
            pairs.setdefault(model, []).append(candidate)
    return pairs


def _calibrated(key: str) -> bool:
    try:
        return recipe_from_key(key).calibrated
    except AuditInputError:  # a key that names no recipe fails its own run's preflight, in one line
        return True


class AuditRuns:
    """The runs one audit took, in order (it stops after a run that failed), read as one result: what the CLI
    and the tests ask of a run (`success`, `output_for_node`, materializations, checks, events)."""

    def __init__(self, results: list):
        self.results = results

    @property
    def success(self) -> bool:
        return all(r.success for r in self.results)

    @property
    def run_id(self) -> str:
        """The run a person looks at first: the one that failed, else the candidate's, else the last."""
        failed = [r for r in self.results if not r.success]
        candidate = [r for r in self.results if r.dagster_run.tags.get(CANDIDATE_TAG)]
        return (failed or candidate or self.results)[-1].run_id

    @property
    def run_ids(self) -> list[str]:
        return [r.run_id for r in self.results]

    @property
    def all_events(self) -> list:
        return [e for r in self.results for e in r.all_events]

    def output_for_node(self, name: str):
        for result in self.results:
            if result.job_def.has_node_named(name):
                return result.output_for_node(name)
        raise KeyError(f"no run of this audit materialized {name}")

    def get_asset_materialization_events(self) -> list:
        return [e for r in self.results for e in r.get_asset_materialization_events()]

    def get_asset_check_evaluations(self) -> list:
        return [e for r in self.results for e in r.get_asset_check_evaluations()]


def run_phases(execute, selection: list[str] | None, model: str, recipe: Recipe) -> AuditRuns:
    """Run the phases a selection takes, in order, each through `execute(phase, stages, partition_key)`, and
    stop after the first that fails (a candidate is not judged against a base that did not build)."""
    results = []
    for phase, stages in phases(selection):
        results.append(execute(phase, stages, partition(phase, model, recipe)))
        if not results[-1].success:
            break
    return AuditRuns(results)
