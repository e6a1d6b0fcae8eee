"""Validate every user input before any heavy work, so bad input costs seconds and leaves nothing behind."""

from pathlib import Path

from quant_pipeline.evaluation.policy import load_policy
from quant_pipeline.models.calibration import check_enough_samples, load_calibration_texts
from quant_pipeline.models.checkpoint import read_model_config, resolve_model_source
from quant_pipeline.models.gptq import check_recipe_fits


def preflight(settings) -> None:
    """Raise AuditInputError (one line: what, where, how to fix) for the first bad input found."""
    settings.recipe.validate_values()
    source = resolve_model_source(settings.model)
    check_recipe_fits(settings.recipe, read_model_config(source), source.name)
    calibration = Path(settings.calibration_file)
    check_enough_samples(load_calibration_texts(calibration), calibration, settings.recipe)
    load_policy(Path(settings.policy_file))
