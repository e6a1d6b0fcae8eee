"""Models and candidates as partitions: which runs a selection takes, and what a model key is."""

import dagster as dg
import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.definitions import defs
from quant_pipeline.defs.candidates import AUDITS, MODELS, model_key, partition, phases


def test_a_full_audit_is_the_model_run_then_the_candidate_run_then_the_comparison():
    assert [phase for phase, _ in phases(None)] == ["model", "candidate", "comparison"]
    assert phases(["delta_report", "approval", "audit_report"]) == [
        ("candidate", ["delta_report", "approval"]),
        ("comparison", ["audit_report"]),
    ]
    assert phases(["candidate_tradeoff"]) == [("comparison", ["candidate_tradeoff"])]


def test_each_stage_is_partitioned_by_what_it_belongs_to():
    graph = {a.key.to_user_string(): a.partitions_def for a in defs.resolve_all_asset_specs()}
    assert graph["base_eval_results"] == MODELS and graph["candidate_tradeoff"] == MODELS
    assert graph["quantized_eval_results"] == AUDITS and graph["approval"] == AUDITS
    assert graph["runtime_environment"] is None  # the machine, not a model
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"model_stages", "candidate_stages", "comparison"} <= jobs


def test_a_model_key_is_an_absolute_path_or_the_name_given(tmp_path, monkeypatch):
    folder = tmp_path / "final"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_key("final") == str(folder) and model_key("default") == "default"
    with pytest.raises(AuditInputError, match=r"cannot contain \| , \[ or \]"):
        model_key("a|b")


def test_a_candidate_run_is_keyed_by_model_and_candidate():
    key = partition("candidate", "default", Recipe(method="identity"))
    assert isinstance(key, dg.MultiPartitionKey) and key.keys_by_dimension == {
        "model": "default",
        "candidate": "identity",
    }
    assert partition("model", "default", Recipe()) == "default" == partition("comparison", "default", Recipe())
