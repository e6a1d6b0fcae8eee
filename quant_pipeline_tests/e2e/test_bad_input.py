"""Bad input stops the audit before heavy work with a one-line error, and leaves nothing behind."""

import shutil
from pathlib import Path

import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.defs.candidates import MODEL_STAGES
from quant_pipeline.defs.preflight import preflight
from quant_pipeline_tests.support import TINY_RECIPE, replace, run_audit, write_jsonl


def assert_nothing_left(settings, tracker, result, candidate_only: bool = False):
    """Nothing at all; or, for a candidate's bad input (`candidate_only`), nothing past the model's own stages,
    which ran in a run of their own and are valid without the candidate."""
    assert not result.success
    made = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert made <= set(MODEL_STAGES) if candidate_only else made == set()
    store = Path(settings.store_dir)
    assert not (store / "artifacts").exists() or not any((store / "artifacts").iterdir())
    versions = tracker.client().search_model_versions() if candidate_only else []
    assert {v.tags.get("kind") for v in versions} <= {"base"}
    if not candidate_only:
        assert not (store / "trail").exists()
        assert tracker.client().search_registered_models() == []


def run_bad(settings, tracker, instance, expected: str, candidate_only: bool = False):
    with pytest.raises(AuditInputError) as err:
        preflight(settings, settings.recipe)
    message = str(err.value)
    assert "\n" not in message and expected in message
    result = run_audit(settings, tracker, instance)
    assert_nothing_left(settings, tracker, result, candidate_only)
    failure = next(e for e in result.all_events if e.is_failure)
    assert expected in failure.message or expected in str(failure.event_specific_data)
    return message


def test_missing_model_path_names_the_path_and_the_fix(tiny_settings, mlflow_tracker, instance, tmp_path):
    missing = tmp_path / "no-such-model"
    message = run_bad(replace(tiny_settings, model=str(missing)), mlflow_tracker, instance, str(missing))
    assert "does not exist" in message and "QP_MODEL" in message


def test_empty_calibration_file_is_refused(tiny_settings, mlflow_tracker, instance, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    message = run_bad(replace(tiny_settings, calibration_file=str(empty)), mlflow_tracker, instance, "is empty")
    assert str(empty) in message


def test_malformed_calibration_line_is_reported_with_its_number(tiny_settings, mlflow_tracker, instance, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    message = run_bad(replace(tiny_settings, calibration_file=str(bad)), mlflow_tracker, instance, f"{bad}:3")
    assert "not valid JSON" in message


def test_calibration_line_without_text_field_is_reported(tiny_settings, mlflow_tracker, instance, tmp_path):
    bad = write_jsonl(tmp_path / "notext.jsonl", [{"text": "ok"}, {"body": "wrong field"}])
    run_bad(replace(tiny_settings, calibration_file=str(bad)), mlflow_tracker, instance, f"{bad}:2: field `text`")


def test_binary_calibration_file_is_refused_with_the_line_of_the_first_bad_byte(
    tiny_settings, mlflow_tracker, instance, tmp_path
):
    binary = tmp_path / "calibration.jsonl"
    binary.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n\x00\x01\x02\xff\xfe binary tail')
    message = run_bad(replace(tiny_settings, calibration_file=str(binary)), mlflow_tracker, instance, f"{binary}:3")
    assert "not UTF-8 text" in message and "NUL byte" in message


def test_truncated_safetensors_weights_are_refused_before_loading(
    tiny_settings, tiny_llama, mlflow_tracker, instance, tmp_path
):
    copy = Path(shutil.copytree(tiny_llama, tmp_path / "tiny_copy"))
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    message = run_bad(replace(tiny_settings, model=str(copy)), mlflow_tracker, instance, str(weights))
    assert "cannot be read" in message and "truncated" in message


@pytest.mark.parametrize("field", ["eval_limit", "eval_max_new_tokens", "eval_batch_size"])
def test_an_eval_size_of_zero_is_refused_by_its_name(tiny_settings, mlflow_tracker, instance, field):
    message = run_bad(replace(tiny_settings, **{field: 0}), mlflow_tracker, instance, f"{field}=0")
    assert "at least 1" in message


def test_calibration_too_short_for_recipe(tiny_settings, mlflow_tracker, instance, tmp_path):
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": f"sample {i}"} for i in range(3)])
    settings = replace(tiny_settings, calibration_file=str(short))
    message = run_bad(settings, mlflow_tracker, instance, "has 3 samples", candidate_only=True)
    assert "calibration_samples is 8" in message


def test_group_size_that_does_not_divide_the_model_is_refused(tiny_settings, mlflow_tracker, instance):
    settings = replace(tiny_settings, recipe=Recipe(group_size=96, calibration_samples=8, seq_len=64))
    message = run_bad(settings, mlflow_tracker, instance, "group_size=96 does not divide", candidate_only=True)
    assert "hidden_size 128" in message and "use group_size" in message


def test_default_model_group_size_128_is_refused_before_loading(tiny_settings):
    settings = replace(tiny_settings, model="default", recipe=Recipe(group_size=128))
    with pytest.raises(AuditInputError, match="hidden_size 576: use group_size 64"):
        preflight(settings, settings.recipe)


def test_policy_with_unknown_metric_is_refused(tiny_settings, mlflow_tracker, instance, tmp_path):
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: typo\ntolerances:\n  accuracy: {direction: higher_is_better, tolerance: 0.05}\n")
    message = run_bad(
        replace(tiny_settings, policy_file=str(policy)), mlflow_tracker, instance, "unknown metric 'accuracy'"
    )
    assert str(policy) in message and "known metrics: acc" in message


def test_model_directory_with_pickled_weights_only_is_refused(tiny_settings, tmp_path):
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AuditInputError, match="safetensors only"):
        preflight(replace(tiny_settings, model=str(legacy)), TINY_RECIPE)
