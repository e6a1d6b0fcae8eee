"""Validate every user input before any heavy work, so bad input costs seconds and leaves nothing behind."""

from pathlib import Path

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.evaluation.policy import load_policy
from quant_pipeline.models.calibration import check_enough_samples, load_calibration_texts
from quant_pipeline.models.checkpoint import check_weights_readable, read_model_config
from quant_pipeline.models.identity import check_same_architecture
from quant_pipeline.models.methods import check_recipe_fits
from quant_pipeline.models.placement import placement
from quant_pipeline.release.governing import base_architecture, check_governing
from quant_pipeline.release.tradeoff import OBJECTIVES

# setting -> (CLI option, environment variable, what a value below 1 would mean, the fix)
EVAL_SIZES = {
    "eval_limit": ("--eval-limit", "QP_EVAL_LIMIT", "items per eval task", "omit it to run every item"),
    "eval_max_new_tokens": (
        "--eval-max-new-tokens",
        "QP_EVAL_MAX_NEW_TOKENS",
        "generated tokens per answer",
        "omit it to use each item's own budget",
    ),
    "eval_batch_size": (None, None, "items per forward pass", "8 is the default"),
}


def check_eval_sizes(settings) -> None:
    """A size below 1 would run an empty (or endless) suite and fail deep inside lm-eval; refuse it by name."""
    for field, (option, env, meaning, fix) in EVAL_SIZES.items():
        value = getattr(settings, field)
        if value is None or value >= 1:
            continue
        named = " / ".join(f"`{n}`" for n in (option, env) if n)
        raise AuditInputError(
            f"{field}={value!r}{f' ({named})' if named else ''}: must be a whole number of {meaning}, at least 1; {fix}"
        )


def preflight(settings, recipe=None, model: str | None = None, instance=None) -> None:
    """Raise AuditInputError (one line: what, where, how to fix) for the first bad input found. `model`: the
    run's model partition (else the settings' model); `recipe`: the candidate to check against the model and
    the calibration set (None: a run of the model's own stages, which has none)."""
    check_eval_sizes(settings)
    if settings.objective not in OBJECTIVES:
        raise AuditInputError(f"objective {settings.objective!r} (`QP_OBJECTIVE`): use one of {', '.join(OBJECTIVES)}")
    placement(settings.device)  # a GPU asked for where torch sees none is refused before any work
    if recipe is not None:
        recipe.validate_values()
    source = settings.source(model, instance)
    check_weights_readable(source)
    previous = base_architecture(settings.store, source.name)  # a trail read: the config only if there is one
    if previous is not None:
        check_same_architecture(source.name, previous, read_model_config(source), settings.new_base_version)
    calibration = Path(settings.calibration_file)
    texts = load_calibration_texts(calibration)
    if recipe is not None:
        check_recipe_fits(recipe, read_model_config(source), source.name)
        check_enough_samples(texts, calibration, recipe)
    _, policy_hash = load_policy(Path(settings.policy_file))
    check_governing(settings.store, source.name, Path(settings.policy_file), policy_hash)
