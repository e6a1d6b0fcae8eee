"""The artifact store: the only place store paths are built, names refused before they touch a path,
unique temp names per writer, and what a killed run left behind swept at the next start."""

import json
import os
import subprocess
import sys
import threading

import pytest

from quant_pipeline.core.store import (
    TMP_PREFIX,
    ArtifactStore,
    StoreError,
    append_line_locked,
    atomic_file,
    check_name,
    read_lines_locked,
    write_json_atomic,
)

TRAVERSAL_NAMES = [
    "../trail",
    "..",
    ".",
    "a/b",
    "/etc",
    "a\\b",
    "",
    "x" * 200,
    "it's",
    "a'; DROP",
    ".hidden",
    "a..b",
    "ok\n",
]
LAYOUT_CALLS = [
    "checkpoint_dir",
    "artifact_dir",
    "artifact_record_path",
    "eval_dir",
    "report_dir",
    "trail_path",
    "requests_path",
]


@pytest.mark.parametrize("name", TRAVERSAL_NAMES)
@pytest.mark.parametrize("call", LAYOUT_CALLS)
def test_every_store_path_refuses_names_that_could_leave_its_folder(tmp_path, call, name):
    store = ArtifactStore(tmp_path / "store")
    with pytest.raises(StoreError) as refused:
        getattr(store, call)(name)
    message = str(refused.value)
    assert "\n" not in message and "letters, digits" in message


@pytest.mark.parametrize(
    "name", ["SmolLM2-135M-Instruct", "gptq-w4g64-0123456789ab", "base-0123abcd", "org--name", "v1.2_x"]
)
def test_ordinary_model_names_and_artifact_ids_are_accepted(tmp_path, name):
    store = ArtifactStore(tmp_path)
    assert store.artifact_dir(name) == tmp_path.resolve() / "artifacts" / name
    assert check_name(name) == name


def test_two_writers_of_the_same_file_never_share_a_temp_name(tmp_path):
    target = tmp_path / "evals" / "key" / "record.json"
    with atomic_file(target) as first, atomic_file(target) as second:
        assert first != second and first.parent == second.parent == target.parent
        first.write_text("one")
        second.write_text("two")
    assert target.read_text() == "one" and sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = write_json_atomic(tmp_path / "r.json", {"v": 1})
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_temp_files_of_a_dead_process_are_swept_and_a_live_ones_kept(tmp_path):
    store = ArtifactStore(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = tmp_path / "artifacts" / f"{TMP_PREFIX}gptq-w4g64-abc-{dead_pid}-deadbeef"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"partial")
    legacy = tmp_path / "artifacts" / ".tmp-gptq-w4g64-abc-1a2b3c4d"  # written before pids were in the name
    legacy.mkdir()
    live = tmp_path / "evals" / f"{TMP_PREFIX}record.json-{os.getpid()}-cafebabe"
    live.parent.mkdir()
    live.write_text("{}")
    removed = store.sweep_stale()
    assert set(removed) == {left, legacy} and not left.exists() and not legacy.exists() and live.exists()


def test_locked_appends_from_many_threads_lose_and_tear_nothing(tmp_path):
    path = tmp_path / "log.jsonl"

    def append(i: int) -> None:
        for j in range(25):
            append_line_locked(path, lambda last, i=i, j=j: json.dumps({"i": i, "j": j, "pad": "x" * 500}))

    threads = [threading.Thread(target=append, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = read_lines_locked(path)
    assert len(lines) == 200 and len({(json.loads(x)["i"], json.loads(x)["j"]) for x in lines}) == 200


APPEND_REQUESTS = """
import sys
from quant_pipeline.serving.request_log import append_request
for n in range(100):
    append_request(sys.argv[1], {"request_id": f"{sys.argv[2]}-{n}", "pad": "x" * 3000})
"""


def test_request_log_appends_from_two_processes_on_one_store_lose_and_tear_nothing(tmp_path):
    """Two serving hosts that share the store's volume (the Helm values mount it ReadWriteMany) write one request
    log: each process's appends are whole lines under the flock, none lost, none interleaved (3 KB lines: longer
    than one atomic pipe write, so without the lock they could tear)."""
    path = tmp_path / "requests" / "tiny.jsonl"
    hosts = [
        subprocess.Popen([sys.executable, "-c", APPEND_REQUESTS, str(path), f"host-{i}"], stderr=subprocess.PIPE)
        for i in (1, 2)
    ]
    assert [h.wait(timeout=120) for h in hosts] == [0, 0], [h.stderr.read().decode()[-2000:] for h in hosts]
    lines = read_lines_locked(path)
    ids = [json.loads(line)["request_id"] for line in lines]
    assert len(lines) == 200 and set(ids) == {f"host-{i}-{n}" for i in (1, 2) for n in range(100)}


def test_a_torn_last_line_is_refused_or_closed_off_on_request(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"a": 1}\n{"b": ')
    with pytest.raises(StoreError, match="incomplete"):
        append_line_locked(path, lambda last: "{}")
    append_line_locked(path, lambda last: '{"c": 3}', repair_torn=True)
    assert read_lines_locked(path) == ['{"a": 1}', '{"b": ', '{"c": 3}']
