"""Candidates as Dagster partitions: every stage from the quantized artifact to the approval is partitioned by
candidate, so each variant keeps its own history, staleness and runs in the UI, while the base checkpoint, the
calibration set and the base evaluation are unpartitioned and shared by every candidate of the model.

A partition key is a recipe written out (`gptq-w4-g64`, `torchao-int8-weight`, `identity`: see
`core.recipe.candidate_key`), so a candidate added in the UI ("Add partition") or by `quant-pipeline audit
--method ...` needs no code and no file; a key that names no valid recipe fails the run's preflight in one line.
"""

import dagster as dg

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe, candidate_key, recipe_from_key

CANDIDATES = dg.DynamicPartitionsDefinition(name="candidate")
PARTITION_TAG = "dagster/partition"


def candidate_recipe(context: dg.AssetExecutionContext) -> Recipe:
    """The recipe of the partition a stage runs for."""
    return recipe_from_key(context.partition_key)


def run_recipe(run: dg.DagsterRun | None) -> Recipe | None:
    """The recipe of a run's candidate partition (None: the run targets no candidate)."""
    key = (run.tags or {}).get(PARTITION_TAG) if run is not None else None
    return recipe_from_key(key) if key else None


def register_candidate(instance: dg.DagsterInstance, recipe: Recipe) -> str:
    """Add the recipe's partition (once) and return its key."""
    recipe.validate_values()
    key = candidate_key(recipe)
    if not instance.has_dynamic_partition(CANDIDATES.name, key):
        instance.add_dynamic_partitions(CANDIDATES.name, [key])
    return key


def candidates(instance: dg.DagsterInstance, calibrated_only: bool = False) -> list[str]:
    """Every registered candidate key (those whose method reads the calibration set, if asked)."""
    keys = instance.get_dynamic_partitions(CANDIDATES.name)
    return [k for k in keys if not calibrated_only or _calibrated(k)]


def _calibrated(key: str) -> bool:
    try:
        return recipe_from_key(key).calibrated
    except AuditInputError:  # a key that names no recipe fails its own run's preflight, in one line
        return True


def takes_candidate(assets: list, selection) -> bool:
    """Whether materializing `selection` (names; None: all) of `assets` runs a candidate-partitioned stage, so
    needs a partition key (a run of the shared stages alone, like the tradeoff, takes none)."""
    partitioned = {a.key.to_user_string() for a in assets if a.partitions_def is not None}
    return selection is None or bool(partitioned & {str(s) for s in selection})
