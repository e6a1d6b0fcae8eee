"""The audit's resources: validated when a run starts (not on sensor ticks), nothing written at import."""

import os
import subprocess
import sys

import dagster as dg
import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.defs.automation import base_model_sensor, calibration_data_sensor
from quant_pipeline.defs.resources import AuditSettings


def test_a_sensor_tick_reports_an_unusable_model_as_its_own_skip_reason(tmp_path):
    gone = tmp_path / "no-such-model"
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions("model", [str(gone)])  # a model partition whose folder went away
        settings = AuditSettings(store_dir=str(tmp_path / "store"))
        result = base_model_sensor(dg.build_sensor_context(instance=instance, resources={"settings": settings}))
    assert (
        not result.run_requests
        and f"{gone}: unusable (model path {gone} does not exist" in result.skip_reason.skip_message
    )


def test_a_sensor_tick_reports_a_missing_calibration_file(tmp_path, mlflow_tracker):
    settings = AuditSettings(calibration_file=str(tmp_path / "gone.jsonl"), store_dir=str(tmp_path / "store"))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        resources = {"settings": settings, "mlflow": mlflow_tracker}
        context = dg.build_sensor_context(instance=instance, resources=resources)
        skipped = calibration_data_sensor(context)
    assert isinstance(skipped, dg.SkipReason) and "does not exist" in skipped.skip_message


def test_a_run_with_bad_input_stops_when_it_starts_and_sweeps_dead_temp_files(tmp_path, tiny_llama):
    left = tmp_path / "store" / "artifacts" / ".tmp-gptq-w4g64-abc-999999999-deadbeef"
    left.mkdir(parents=True)
    settings = AuditSettings(model=str(tmp_path / "no-such-model"), store_dir=str(tmp_path / "store"))

    @dg.asset
    def probe(settings: AuditSettings) -> None: ...

    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        with pytest.raises(dg.DagsterResourceFunctionError) as stopped:
            dg.materialize([probe], resources={"settings": settings}, instance=instance)
    assert isinstance(stopped.value.__cause__, AuditInputError) and "does not exist" in str(stopped.value.__cause__)
    assert left.exists()  # bad input stops the run before anything is touched
    good = AuditSettings(model=str(tiny_llama), store_dir=str(tmp_path / "store"))
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        assert dg.materialize([probe], resources={"settings": good}, instance=instance).success
    assert not left.exists()  # a run that starts cleans up after one that was killed


def test_importing_the_definitions_writes_no_file(tmp_path):
    env = {**os.environ, "QP_HOME": str(tmp_path), "DAGSTER_HOME": str(tmp_path / "dh")}
    env.pop("QP_STORE_DIR", None)
    env.pop("QP_MLFLOW_TRACKING_URI", None)
    subprocess.run([sys.executable, "-c", "import quant_pipeline.definitions, quant_pipeline.cli"], env=env,
                   cwd=tmp_path, check=True)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []
