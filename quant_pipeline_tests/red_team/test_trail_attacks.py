"""Red team: attacks on a model's audit trail, each of which must be caught, and refused in one line.

Whoever can write the store can edit, cut, extend or swap the trail file; the chain catches edits
in the middle, the anchor on the MLflow registered model (outside the store) catches the rest. All
real: an SQLite MLflow registry and files on disk, trails built through `record_event` (no model).
"""

import json
import shutil

import pytest

from quant_pipeline.cli import main
from quant_pipeline.core.hashing import sha256_file, tree_hash
from quant_pipeline.core.records import ArtifactRecord, DeltaReportRecord
from quant_pipeline.release import signoff
from quant_pipeline.release.trail import append_entry, entry_hash, head_hash, verify_trail
from quant_pipeline_tests.support import cli_home

H = "a" * 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One store and one MLflow registry for the module (each test uses its own model name)."""
    with cli_home(tmp_path_factory.mktemp("red_team")) as world:
        yield world


def build_trail(world, model: str, n: int = 4):
    store, tracker = world
    for i in range(n):
        signoff.record_event(store, tracker, model, {"event": "audit", "artifact_id": f"gptq-{model}-{i}"})
    path = signoff.trail_path(store, model)
    assert signoff.verify_model_trail(store, tracker, model) == []
    return path


def fake_artifact(world, model: str) -> str:
    """An artifact record with real file hashes and a passed delta report: enough for `approve` to reach the trail."""
    store, _ = world
    aid = f"gptq-w4g64-{model}"
    folder = store.artifact_dir(aid)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    files = {"model.safetensors": sha256_file(folder / "model.safetensors")}
    ArtifactRecord(
        artifact_id=aid, model_name=model, base_hash=H, base_path="/base", recipe={"bits": 4},
        calibration_hash=H, calibration_count=1, runtime_hash=H, runtime={}, precision="w4",
        scales={"hash": H, "layers": 0}, files=files, content_hash=tree_hash(files), size_bytes=7,
    ).write(store.artifact_record_path(aid))  # fmt: skip
    report = store.delta_report_dir(aid, "k")
    DeltaReportRecord(
        artifact_id=aid, model_name=model, registry_version="1", policy_path="/p.yaml", policy_hash=H,
        policy_name="p", allow_override=False, base_eval_key="b", eval_key="q", verdict="PASS", passed=True,
        reasons=[], failing=[], incomplete=[], waived=[], measured_metrics=["acc"], policy_metrics=["acc"],
        categories=["all"], path=str(report / "d.parquet"), markdown_path="d.md", html_path="d.html",
    ).write(report / "delta_report.json")  # fmt: skip
    return aid


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_refusal(err: str, *needles: str) -> None:
    assert err.startswith("quant-pipeline: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_unknown_model_is_refused_not_reported_intact(world, capsys):
    with pytest.raises(signoff.UnknownTrailError, match="no trail for model NoSuchModel: check the name"):
        signoff.verify_model_trail(*world, "NoSuchModel")
    code, out, err = cli(capsys, "verify-trail", "NoSuchModel")
    assert code == 2 and "intact" not in out
    assert_one_line_refusal(err, "no trail for model NoSuchModel")


def test_intact_trail_is_intact_and_anchored(world, capsys):
    store, tracker = world
    path = build_trail(world, "intact")
    tags = tracker.model_tags("intact")
    assert tags["trail_head"] == head_hash(path) and tags["trail_length"] == "4"
    code, out, _ = cli(capsys, "verify-trail", "intact")
    assert code == 0 and "intact" in out
    code, out, _ = cli(capsys, "verify-trail", "intact", "--expected-head", head_hash(path))
    assert code == 0 and "intact" in out
    code, out, _ = cli(capsys, "verify-trail", "intact", "--expected-head", "f" * 64)  # the extra anchor still counts
    assert code == 1 and "head hash differs" in out


def test_deleted_last_entry_is_detected_and_not_laundered_by_the_next_append(world, capsys):
    store, tracker = world
    path = build_trail(world, "cut")
    lines = path.read_text().splitlines()
    path.write_text("".join(line + "\n" for line in lines[:-1]))
    assert verify_trail(path) == []  # the file alone still looks fine
    problems = signoff.verify_model_trail(store, tracker, "cut")
    assert any(p.startswith("head hash differs from the anchor") for p in problems)
    assert any("anchor records 4 entries but the trail has 3" in p for p in problems)
    code, out, _ = cli(capsys, "verify-trail", "cut")
    assert code == 1 and "BROKEN" in out and "head hash differs" in out
    # the pipeline's next append must not re-anchor the shortened trail
    with pytest.raises(signoff.SignOffError, match="does not end at its MLflow anchor"):
        signoff.record_event(store, tracker, "cut", {"event": "audit"})
    assert len(path.read_text().splitlines()) == 3 and tracker.model_tags("cut")["trail_length"] == "4"
    code, _, err = cli(capsys, "rollback", "cut", "--by", "Mallory", "--note", "quietly")
    assert code == 2
    assert_one_line_refusal(err, "cannot roll back cut", "head hash differs")


def test_removed_final_newline_is_detected_and_approve_refuses_in_one_line(world, capsys):
    store, tracker = world
    path = build_trail(world, "torn")
    aid = fake_artifact(world, "torn")
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    problems = verify_trail(path)
    assert len(problems) == 1 and "torn" in problems[0] and "does not end in a newline" in problems[0]
    assert signoff.verify_model_trail(store, tracker, "torn") == problems  # head and count still match
    code, out, _ = cli(capsys, "verify-trail", "torn")
    assert code == 1 and "torn" in out
    code, _, err = cli(capsys, "approve", aid, "--by", "Ada", "--note", "looks fine")
    assert code == 2
    assert_one_line_refusal(err, f"cannot approve {aid}", "torn")
    with pytest.raises(signoff.SignOffError, match="cannot promote"):
        signoff.promote(store, tracker, aid, by="Ada")


def test_torn_write_mid_line_is_detected(world, capsys):
    path = build_trail(world, "crashed", 2)
    with open(path, "a") as f:
        f.write('{"seq": 2, "event": "appro')
    code, out, _ = cli(capsys, "verify-trail", "crashed")
    assert code == 1 and "line 3: not a JSON trail entry" in out and "torn" in out


def test_edited_entry_is_detected(world, capsys):
    store, tracker = world
    path = build_trail(world, "edited")
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["artifact_id"] = "gptq-forged"
    lines[1] = json.dumps(entry)
    path.write_text("".join(line + "\n" for line in lines))
    assert "entry 1 (line 2): content was edited" in signoff.verify_model_trail(store, tracker, "edited")
    code, out, _ = cli(capsys, "verify-trail", "edited")
    assert code == 1 and "content was edited" in out


def test_edited_last_entry_with_recomputed_hash_is_caught_by_the_anchor(world):
    store, tracker = world
    path = build_trail(world, "rehashed")
    lines = path.read_text().splitlines()
    entry = json.loads(lines[-1])
    entry["artifact_id"] = "gptq-forged"
    entry["hash"] = entry_hash(entry)
    lines[-1] = json.dumps(entry)
    path.write_text("".join(line + "\n" for line in lines))
    assert verify_trail(path) == []  # self-consistent: only the anchor can tell
    problems = signoff.verify_model_trail(store, tracker, "rehashed")
    assert len(problems) == 1 and problems[0].startswith("head hash differs from the anchor")


def test_trail_replaced_by_a_shorter_valid_chain_is_caught_by_the_anchor(world, tmp_path, capsys):
    store, tracker = world
    path = build_trail(world, "swapped", 5)
    forged = tmp_path / "forged.jsonl"
    for i in range(2):
        append_entry(forged, {"event": "audit", "artifact_id": f"gptq-clean-{i}"})
    shutil.copy(forged, path)
    assert verify_trail(path) == []  # a valid chain in its own right
    problems = signoff.verify_model_trail(store, tracker, "swapped")
    assert any(p.startswith("head hash differs from the anchor") for p in problems)
    assert any("anchor records 5 entries but the trail has 2" in p for p in problems)
    code, out, _ = cli(capsys, "verify-trail", "swapped")
    assert code == 1 and "trail was replaced" in out


def test_entry_appended_behind_the_pipelines_back_is_detected(world):
    store, tracker = world
    path = build_trail(world, "extended", 2)
    append_entry(path, {"event": "approved", "artifact_id": "gptq-extended-1", "by": "Mallory"})
    problems = signoff.verify_model_trail(store, tracker, "extended")
    assert any("anchor records 2 entries but the trail has 3" in p for p in problems)
    with pytest.raises(signoff.SignOffError, match="does not end at its MLflow anchor"):
        signoff.record_event(store, tracker, "extended", {"event": "audit"})


def test_deleted_trail_file_is_detected(world, capsys):
    path = build_trail(world, "vanished", 3)
    path.unlink()
    code, out, _ = cli(capsys, "verify-trail", "vanished")
    assert code == 1 and "trail file is missing but MLflow anchors 3 entries" in out
    with pytest.raises(signoff.SignOffError, match="does not end at its MLflow anchor"):
        signoff.record_event(*world, "vanished", {"event": "audit"})  # no fresh chain under an old anchor


def test_trail_without_an_anchor_is_not_called_intact(world, capsys):
    store, _ = world
    append_entry(store.trail_path("unanchored"), {"event": "audit"})
    code, out, _ = cli(capsys, "verify-trail", "unanchored")
    assert code == 1 and "not anchored in MLflow" in out


def test_racing_appenders_leave_the_anchor_on_the_true_head(world):
    """The anchor moves under the trail's lock: appenders finishing out of order cannot leave it behind."""
    import threading

    store, tracker = world

    def worker(t):
        for i in range(4):
            signoff.record_event(store, tracker, "raced", {"event": "audit", "thread": t, "i": i})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert signoff.verify_model_trail(store, tracker, "raced") == []
    assert tracker.model_tags("raced")["trail_length"] == "16"


def test_an_approval_forged_into_the_trail_right_after_its_check_is_not_what_promote_acts_on(world, monkeypatch):
    """The anchor check and the reads a decision rests on are one read: whoever can write the store and swaps the
    trail in the instant after it verified (a chained `approved` entry, hashes and all, that only the anchor would
    catch) must not get an unapproved artifact promoted. Before, `promote` read the file again after the check,
    found the forged approval, and moved `production` before its own append was refused."""
    store, tracker = world
    model = "swapped-after-check"
    aid = fake_artifact(world, model)
    content_hash = ArtifactRecord.read(store.artifact_record_path(aid)).content_hash
    with tracker.stage_run(model, f"register {aid}") as run:
        version = tracker.register_artifact(
            model, aid, "file:///nowhere", run.run_id, {"artifact_id": aid, "content_hash": content_hash}
        )
    signoff.record_event(store, tracker, model, {"event": "audit", "artifact_id": aid, "content_hash": content_hash})
    path = signoff.trail_path(store, model)
    genuine = path.read_bytes()
    last = json.loads(genuine.splitlines()[-1])
    forged = {
        "event": "approved", "artifact_id": aid, "registry_version": str(version), "by": "Mallory", "note": "",
        "content_hash": content_hash, "seq": last["seq"] + 1, "prev_hash": last["hash"], "at": last["at"],
        "schema_version": 1,
    }  # fmt: skip
    forged["hash"] = entry_hash(forged)
    checked = signoff.read_verified

    def swapped_right_after_the_check(*args, **kwargs):
        found = checked(*args, **kwargs)
        path.write_bytes(genuine + (json.dumps(forged) + "\n").encode())
        return found

    monkeypatch.setattr(signoff, "read_verified", swapped_right_after_the_check)
    with pytest.raises(signoff.SignOffError, match=f"artifact {aid} is not approved"):
        signoff.promote(store, tracker, aid, by="Mallory")
    assert tracker.alias_version(model, "production") is None
    assert signoff.is_approved(store, model, aid)  # what a second read of the file would have believed
    monkeypatch.undo()
    assert any("anchor" in p for p in signoff.verify_model_trail(store, tracker, model))  # and what the anchor says
