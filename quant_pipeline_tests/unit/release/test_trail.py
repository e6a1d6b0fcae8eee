"""The hash-chained trail: what an edit, a removal, a cut-off end or a torn line looks like to `verify_trail`."""

import json
import threading

import pytest

from quant_pipeline.release.trail import append_entry, entry_hash, head_hash, read_entries, read_verified, verify_trail


def _trail(tmp_path, n=6):
    path = tmp_path / "approvals" / "trail.jsonl"
    for i in range(n):
        append_entry(
            path,
            {
                "artifact_id": "gptq-w4g64-abc",
                "decision": "pending sign-off" if i % 2 else "approved",
                "approver": f"user{i}",
            },
        )
    return path


def _rewrite(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


# --- trail -------------------------------------------------------------------------------------


def test_intact_trail_verifies_and_chains_from_genesis(tmp_path):
    path = _trail(tmp_path)
    entries = read_entries(path)
    assert [e["seq"] for e in entries] == list(range(6))
    assert entries[0]["prev_hash"] == "0" * 64
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:], strict=False))
    assert all(e["at"].endswith("+00:00") for e in entries)
    assert head_hash(path) == entries[-1]["hash"]
    assert verify_trail(path) == []
    assert verify_trail(path, expected_head=head_hash(path)) == []


def test_missing_trail_reads_empty_and_verifies(tmp_path):
    path = tmp_path / "none.jsonl"
    assert read_entries(path) == [] and head_hash(path) is None and verify_trail(path) == []


def test_append_returns_stored_entry_and_keeps_given_time(tmp_path):
    path = tmp_path / "t.jsonl"
    entry = append_entry(path, {"decision": "approved", "at": "2024-01-01T00:00:00+00:00", "path": tmp_path})
    assert read_entries(path) == [entry]
    assert entry["at"] == "2024-01-01T00:00:00+00:00" and entry["path"] == str(tmp_path)
    with pytest.raises(ValueError, match="seq"):
        append_entry(path, {"seq": 7})


def test_edited_entry_is_reported_with_its_entry_number(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[3])
    entry["decision"] = "approved" if entry["decision"] != "approved" else "rejected"
    lines[3] = json.dumps(entry, sort_keys=True)
    _rewrite(path, lines)
    problems = verify_trail(path)
    assert problems == ["entry 3 (line 4): content was edited"]


def test_edited_entry_with_recomputed_hash_breaks_the_next_link(tmp_path):
    from quant_pipeline.release.trail import entry_hash

    path = _trail(tmp_path)
    lines = path.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["approver"] = "mallory"
    entry["hash"] = entry_hash(entry)
    lines[2] = json.dumps(entry)
    _rewrite(path, lines)
    assert verify_trail(path) == ["entry 3: chain broken — an entry before it was removed or reordered"]


def test_removed_middle_entry_is_reported_as_broken_chain(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_text().splitlines()
    del lines[2]
    _rewrite(path, lines)
    problems = verify_trail(path)
    assert "entry 3: chain broken — an entry before it was removed or reordered" in problems
    assert any("seq gap" in p for p in problems)


def test_line_that_is_not_json_is_named(tmp_path):
    path = _trail(tmp_path)
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    _rewrite(path, lines)
    assert "line 2: not a JSON trail entry" in verify_trail(path)
    with pytest.raises(ValueError, match="line 2"):
        read_entries(path)


def test_truncated_last_entry_is_caught_only_with_the_anchor(tmp_path):
    path = _trail(tmp_path)
    anchor = head_hash(path)
    lines = path.read_text().splitlines()
    _rewrite(path, lines[:-1])
    assert verify_trail(path) == []  # the shorter chain is self-consistent
    problems = verify_trail(path, expected_head=anchor)
    assert len(problems) == 1 and problems[0].startswith("head hash differs from the anchor")


def test_missing_final_newline_is_reported_as_torn(tmp_path):
    path = _trail(tmp_path, 3)
    anchor = head_hash(path)
    path.write_bytes(path.read_bytes().rstrip(b"\n"))
    problems = verify_trail(path, expected_head=anchor, expected_length=3)
    assert len(problems) == 1 and problems[0].startswith("line 3: torn — the file does not end in a newline")


def test_anchored_length_catches_a_count_mismatch(tmp_path):
    path = _trail(tmp_path, 3)
    assert verify_trail(path, expected_length=3) == []
    problems = verify_trail(path, expected_length=4)
    assert problems == [
        "the anchor records 4 entries but the trail has 3: "
        "entries were removed or added outside the pipeline, or the trail was replaced"
    ]


def test_before_write_hook_sees_the_chain_and_can_veto_the_append(tmp_path):
    path = _trail(tmp_path, 2)
    seen = []
    entry = append_entry(path, {"decision": "approved"}, before_write=lambda prev, new: seen.append((prev, new)))
    assert seen == [(read_entries(path)[1], entry)]

    def veto(prev, new):
        raise ValueError("anchor moved")

    with pytest.raises(ValueError, match="anchor moved"):
        append_entry(path, {"decision": "approved"}, before_write=veto)
    assert len(read_entries(path)) == 3 and verify_trail(path) == []
    first = []
    append_entry(tmp_path / "new.jsonl", {"decision": "x"}, before_write=lambda prev, new: first.append(prev))
    assert first == [None]


def test_append_refuses_a_torn_last_line(tmp_path):
    path = _trail(tmp_path, 2)
    with open(path, "a") as f:
        f.write('{"seq": 2, "decis')
    with pytest.raises(ValueError, match="incomplete"):
        append_entry(path, {"decision": "approved"})


def test_concurrent_appends_from_8_threads_form_one_intact_chain(tmp_path):
    path = tmp_path / "concurrent.jsonl"

    def worker(t):
        for i in range(25):
            append_entry(path, {"thread": t, "i": i})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = read_entries(path)
    assert len(entries) == 200
    assert [e["seq"] for e in entries] == list(range(200))
    assert len({(e["thread"], e["i"]) for e in entries}) == 200
    assert verify_trail(path, expected_head=head_hash(path)) == []


# --- ML-BOM ------------------------------------------------------------------------------------


def test_read_verified_returns_the_entries_it_verified_and_refuses_a_line_that_is_no_entry(tmp_path):
    path = tmp_path / "trail.jsonl"
    for i in range(3):
        append_entry(path, {"event": "audit", "i": i})
    entries, problems = read_verified(path, expected_head=head_hash(path), expected_length=3)
    assert problems == [] and entries == read_entries(path) and [e["i"] for e in entries] == [0, 1, 2]
    # a chained line, hashes and all, that is not an entry this version writes
    last = entries[-1]
    odd = {"event": "audit", "seq": 3, "prev_hash": last["hash"], "at": "now", "schema_version": 2}
    odd["hash"] = entry_hash(odd)
    with open(path, "a") as f:
        f.write(json.dumps(odd) + "\n")
    entries, problems = read_verified(path)
    assert problems == ["line 4: not a trail entry (field `schema_version`)"] and len(entries) == 4
    assert verify_trail(path) == problems
