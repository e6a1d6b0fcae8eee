"""Canary split, shadow, budgets and backpressure, for real: the tiny Llama's candidates registered in MLflow
(SQLite) as reference-only pyfuncs, served by `Server` and its HTTP front end on loopback, every request
read back from the JSONL log.

Candidates are made by the real methods (identity: the base's bytes; torchao int8: other outputs on some
prompts) and signed off as the trail records a sign-off (a `Decision` appended to the hash-chained, anchored
trail): serving reads only that decision, and the audit that leads to it is pinned by the e2e tests. This
keeps the module to seconds instead of two full audits.
"""

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from quant_pipeline.cli import main
from quant_pipeline.core.hashing import file_hashes, tree_hash
from quant_pipeline.core.paths import PACKAGE_DIR
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.records import Decision, RecordError, RequestLogEntry
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.evaluation.behaviour import check_json_format, check_tool_call
from quant_pipeline.models.methods import artifact_id, precision, quantize
from quant_pipeline.models.tiny import write_tiny_llama
from quant_pipeline.release.reference import base_artifact_id, log_registered_pyfunc
from quant_pipeline.release.signoff import record_event
from quant_pipeline.serving import HttpFrontend, RequestTimeout, Server, ServingConfig, read_requests, reproduce
from quant_pipeline.serving.admission import Admission
from quant_pipeline.serving.arms import bucket, choose_arm, prefix_agreement
from quant_pipeline.serving.resolver import ModelResolver, load_verified
from quant_pipeline.serving.server import greedy_generate
from quant_pipeline_tests.servers import free_port
from quant_pipeline_tests.support import mlflow_db

MODEL = "tiny-canary"
TOKENS = 4
# Every log entry carries these keys, answered or not (null where nothing was measured).
CONTRACT = {
    "request_id", "status", "arm", "arm_reason", "model_version", "artifact_id", "content_hash", "prompt_tokens",
    "output_tokens", "latency_s", "generate_s", "fallback", "refused", "validation", "shadow", "budget",
    "prompt_sha256", "decoding",
}  # fmt: skip


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama as the registered base, and three candidates of it, each a reference-only pyfunc version:
    identity (production, approved), torchao int8 weight-only (canary, approved), and another identity copy
    left pending sign-off. The base is initialised wider than the shared tiny model (0.1, not 0.02), so its greedy
    outputs depend on the prompt and int8 moves some of them: shadow mode has differences to record."""
    root = tmp_path_factory.mktemp("canary")
    tiny_llama = write_tiny_llama(root / "base", tiny_tokenizer, initializer_range=0.1)
    store = ArtifactStore(root / "store")
    tracker = MlflowTracker(tracking_uri=mlflow_db(root), artifact_root=(root / "mlartifacts").as_uri())
    base_hash, runtime_hash = tree_hash(file_hashes(tiny_llama)), fingerprint_hash(runtime_fingerprint())

    def register(directory, aid: str, record: dict) -> tuple[str, str]:
        content_hash = tree_hash(file_hashes(directory))
        with tracker.stage_run(MODEL, f"register {aid}") as run:
            source = log_registered_pyfunc(run.client, run.run_id, directory, record, store_dir=store.root)
            tags = {"kind": record["kind"], "artifact_id": aid, "content_hash": content_hash}
            return str(tracker.register_artifact(MODEL, aid, source, run.run_id, tags)), content_hash

    def candidate(recipe: Recipe, aid: str | None = None) -> tuple[str, str, str]:
        aid = aid or artifact_id(base_hash, recipe, None, runtime_hash, model_name=MODEL)
        out = store.artifact_dir(aid)
        out.mkdir(parents=True)
        quantize(tiny_llama, [], recipe, out)
        record = {"artifact_id": aid, "model_name": MODEL, "kind": "quantized", "recipe": recipe.as_dict(),
                  "base_hash": base_hash, "runtime_hash": runtime_hash, "precision": precision(recipe)}  # fmt: skip
        return (aid, *register(out, aid, record))

    def sign_off(aid: str, version: str, content_hash: str, event: str = "approved") -> None:
        by = "Ada Lovelace" if event == "approved" else None
        decision = Decision(event=event, artifact_id=aid, registry_version=version, by=by, content_hash=content_hash,
                            note="canary serving tests")  # fmt: skip
        record_event(store, tracker, MODEL, decision.model_dump(mode="json"))

    base_version, _ = register(tiny_llama, base_artifact_id(base_hash), {"kind": "base", "model_name": MODEL})
    identity = Recipe(method="identity", bits=8, group_size=-1)
    prod_aid, prod_version, prod_hash = candidate(identity)
    canary_aid, canary_version, canary_hash = candidate(Recipe(method="torchao-int8-weight", bits=8, group_size=-1))
    pending_aid, pending_version, pending_hash = candidate(identity, aid=f"identity-unsigned-{base_hash[:12]}")
    sign_off(prod_aid, prod_version, prod_hash)
    sign_off(canary_aid, canary_version, canary_hash)
    sign_off(pending_aid, pending_version, pending_hash, event="pending sign-off")
    tracker.set_alias(MODEL, "production", prod_version)
    tracker.set_alias(MODEL, "canary", canary_version)
    return SimpleNamespace(
        tracker=tracker, store=store, base_version=base_version, base_hash=base_hash,
        prod_version=prod_version, prod_aid=prod_aid, prod_hash=prod_hash,
        canary_version=canary_version, canary_aid=canary_aid, canary_hash=canary_hash, pending_version=pending_version,
    )  # fmt: skip


@contextmanager
def canary_alias(fleet, version: str | None):
    """Point the canary alias at `version` (None: remove it) for the block, then put it back."""
    if version is None:
        fleet.tracker.client().delete_registered_model_alias(MODEL, "canary")
    else:
        fleet.tracker.set_alias(MODEL, "canary", version)
    try:
        yield
    finally:
        fleet.tracker.set_alias(MODEL, "canary", fleet.canary_version)


def serve(fleet, **config) -> Server:
    return Server(fleet.tracker, MODEL, "production", fleet.store.root, config=ServingConfig(**config))


# Servers shared by the tests below (each loads its models once): all traffic to the canary, shadow mode, budgets.
@pytest.fixture(scope="module")
def all_canary(fleet) -> Server:
    return serve(fleet, canary_share=1.0)


@pytest.fixture(scope="module")
def shadowing(fleet) -> Server:
    return serve(fleet, mode="shadow")


@pytest.fixture(scope="module")
def budgeted(fleet) -> Server:
    return serve(fleet, max_prompt_tokens=256, max_new_tokens=8)


def logged(fleet, request_ids) -> dict[str, list[dict]]:
    """Every log line of these requests (read_requests validates each as a RequestLogEntry)."""
    wanted, out = set(request_ids), {}
    for entry in read_requests(fleet.store, MODEL):
        if entry["request_id"] in wanted:
            out.setdefault(entry["request_id"], []).append(entry)
    return out


def call(url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def ids_in_arm(arm: str, share: float, n: int, prefix: str) -> list[str]:
    """The first n request IDs `prefix-<i>` the bucket rule sends to `arm`."""
    found, i = [], 0
    while len(found) < n:
        rid = f"{prefix}-{i}"
        if (bucket(rid) < share) == (arm == "canary"):
            found.append(rid)
        i += 1
    return found


# -- the rule (no model) ----------------------------------------------------------------------------
def test_the_arm_is_a_pure_function_of_the_request_id_and_the_realized_share_matches_the_configured_one():
    split = ServingConfig(canary_share=0.1)
    ids = [f"req-{i}" for i in range(20_000)]
    arms = [choose_arm(rid, split, "7").arm for rid in ids]
    assert arms == [choose_arm(rid, split, "7").arm for rid in ids], "same ID, same arm"
    assert abs(arms.count("canary") / len(ids) - 0.1) < 0.01
    assert all(0 <= bucket(rid) < 1 for rid in ids[:1000])
    choice = choose_arm("req-3", split, "7")
    expected = "canary" if bucket("req-3") < 0.1 else "production"
    sign = "<" if expected == "canary" else ">="
    assert (choice.arm, choice.reason) == (expected, f"canary share 0.10: bucket {bucket('req-3'):.4f} {sign} 0.10")
    assert {choose_arm(rid, ServingConfig(canary_share=1.0), "7").arm for rid in ids[:500]} == {"canary"}
    assert {choose_arm(rid, ServingConfig(), "7").arm for rid in ids[:500]} == {"production"}
    assert choose_arm("x", split, None).reason == "no canary alias"
    shadow = choose_arm("x", ServingConfig(mode="shadow"), "7")
    assert (shadow.arm, shadow.shadow, shadow.reason) == (
        "production",
        True,
        "shadow: production answers, canary shadows",
    )
    assert prefix_agreement([1, 2, 3, 4], [1, 2, 9]) == 0.5 and prefix_agreement([], []) == 1.0


def test_admission_hands_a_freed_slot_to_the_oldest_waiter_and_refuses_beyond_the_queue():
    gate = Admission(max_concurrency=1, max_queue=2)
    far = time.monotonic() + 30
    assert gate.enter(far) == "ok"
    order, threads = [], []
    for name in ("first", "second"):
        t = threading.Thread(target=lambda n=name: order.append((n, gate.enter(far))))
        t.start()
        threads.append(t)
        while gate.snapshot()[1] < len(threads):  # queued in this order
            time.sleep(0.001)
    assert gate.enter(far) == "busy" and gate.snapshot() == (1, 2)
    gate.leave()
    threads[0].join(5)
    assert order == [("first", "ok")] and gate.snapshot() == (1, 1)
    gate.leave()
    threads[1].join(5)
    assert order[1] == ("second", "ok")
    gate.leave()
    assert gate.snapshot() == (0, 0)
    assert gate.enter(far) == "ok" and gate.enter(time.monotonic() + 0.05) == "timeout" and gate.snapshot() == (1, 0)


def test_log_entries_written_before_the_canary_fields_still_read_and_a_made_up_status_does_not():
    old = {"request_id": "r-1", "time": "2026-11-01T00:00:00+00:00", "model_name": MODEL, "ref": "production",
           "status": "ok", "prompt_sha256": "0" * 64, "decoding": {"strategy": "greedy", "max_new_tokens": 8},
           "artifact_id": "gptq-w4g64-abc", "model_version": 3, "route_reason": "ref: production"}  # fmt: skip
    entry = RequestLogEntry.parse_line(old, "old line")
    assert (entry.arm, entry.fallback, entry.shadow, entry.budget, entry.model_version) == (
        None,
        False,
        None,
        None,
        "3",
    )
    with pytest.raises(RecordError, match="field `status`"):
        RequestLogEntry.parse_line({**old, "status": "maybe"}, "altered line")


def test_a_bad_serving_config_is_refused_in_one_line_naming_the_file_and_the_field(tmp_path, capsys):
    from quant_pipeline.serving.config import EXAMPLE_FILE, load_serving_config

    example = load_serving_config(EXAMPLE_FILE)
    assert (example.canary_share, example.mode, example.max_queue) == (0.1, "split", 4)
    for text, field in (("canary_share: 1.5\n", "canary_share"), ("mode: blue-green\n", "mode"),
                        ("max_concurrency: 0\n", "max_concurrency"), ("canary_shares: 0.1\n", "canary_shares"),
                        ("max_queue: yes\n", "max_queue")):  # fmt: skip
        bad = tmp_path / "serving.yaml"
        bad.write_text(text)
        assert main(["serve", "--http", "--config", str(bad)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"quant-pipeline: error: {bad}: field `{field}`") and "\n" not in err, err
    (tmp_path / "list.yaml").write_text("- 1\n")
    assert main(["serve", "--config", str(tmp_path / "list.yaml")]) == 2
    assert "expected a mapping" in capsys.readouterr().err


# -- HTTP: a canary split under load ------------------------------------------------------------------
def test_fifty_concurrent_requests_on_a_canary_split_are_each_answered_or_refused_busy_and_logged_once(fleet):
    f = fleet
    server = serve(f, canary_share=0.5, max_concurrency=1, max_queue=4)
    version = {"production": f.prod_version, "canary": f.canary_version}
    with HttpFrontend(server) as front:
        ids = [f"burst-{i:02d}" for i in range(50)]
        start = threading.Barrier(len(ids))

        def post(rid: str) -> tuple[int, dict]:
            start.wait()
            return call(
                f"{front.url}/v1/generate", {"prompt": f"Request {rid}", "max_new_tokens": 8, "request_id": rid}
            )

        with ThreadPoolExecutor(len(ids)) as pool:
            answers = dict(zip(ids, pool.map(post, ids), strict=True))
        codes = Counter(code for code, _ in answers.values())
        assert set(codes) <= {200, 503} and codes[200] >= 1 and codes[503] >= 1, codes
        stats = call(f"{front.url}/v1/stats")[1]
        assert (stats["served"], stats["busy"], stats["in_flight"], stats["queued"]) == (codes[200], codes[503], 0, 0)

        # both arms, request IDs picked by the rule, one after the other (nothing busy)
        for arm in ("canary", "production"):
            for rid in ids_in_arm(arm, 0.5, 3, "seq"):
                code, body = call(
                    f"{front.url}/v1/generate", {"prompt": "hello", "max_new_tokens": TOKENS, "request_id": rid}
                )
                assert (code, body["arm"], body["model_version"]) == (200, arm, version[arm])
                answers[rid] = (code, body)
        health = call(f"{front.url}/healthz")[1]
        assert health["production"]["model_version"] == f.prod_version
        assert health["canary"]["model_version"] == f.canary_version

    lines = logged(f, answers)
    assert sorted(lines) == sorted(answers) and all(len(v) == 1 for v in lines.values()), "each request exactly once"
    for rid, (code, body) in answers.items():
        entry = lines[rid][0]
        assert CONTRACT <= set(entry), CONTRACT - set(entry)
        if code == 503:
            assert body["status"] == entry["status"] == "busy" and entry["arm"] is None and entry["output"] is None
            assert "retry later" in entry["error"] and entry["trace_id"] is None
            continue
        arm = "canary" if bucket(rid) < 0.5 else "production"
        assert (entry["status"], entry["arm"], entry["model_version"]) == ("ok", arm, version[arm])
        assert entry["arm_reason"].startswith("canary share 0.50: bucket") and entry["arm_bucket"] == bucket(rid)
        assert (body["output"], body["artifact_id"], body["arm"]) == (entry["output"], entry["artifact_id"], arm)
        assert entry["content_hash"] == (f.canary_hash if arm == "canary" else f.prod_hash)
        assert entry["output_tokens"] == len(entry["output_ids"]) and entry["prompt_tokens"] > 0
        assert entry["latency_s"] >= entry["generate_s"] > 0 and entry["fallback"] is False
        assert entry["budget"] == {"max_prompt_tokens": 2048, "max_new_tokens": 512} and entry["shadow"] is None
    canary_rid = ids_in_arm("canary", 0.5, 1, "seq")[0]
    assert reproduce(f.tracker, f.store.root, MODEL, canary_rid)["status"] == "reproduced exactly"


def test_shutdown_drains_a_request_in_flight_which_is_answered_and_logged(fleet):
    f = fleet
    server = serve(f)
    front = HttpFrontend(server).start()
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(
            answer=call(
                f"{front.url}/v1/generate", {"prompt": "a long one", "max_new_tokens": 256, "request_id": "drain-1"}
            )
        )
    )
    worker.start()
    deadline = time.monotonic() + 60
    while server.admission.snapshot()[0] == 0:
        assert time.monotonic() < deadline and worker.is_alive(), result
        time.sleep(0.005)
    front.shutdown()  # returns once the request in flight has been answered and logged
    worker.join(60)
    code, body = result["answer"]
    assert code == 200 and body["status"] == "ok" and body["output_tokens"] > 0
    assert [e["status"] for e in logged(f, ["drain-1"])["drain-1"]] == ["ok"]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{front.url}/healthz", timeout=5)


# -- shadow ---------------------------------------------------------------------------------------------
def test_shadow_mode_logs_both_outputs_and_whether_they_are_identical(fleet, shadowing):
    f, server = fleet, shadowing
    prompts = [f"Request #{k}: say something {k}" for k in range(4)]
    records = [server.generate(p, max_new_tokens=TOKENS) for p in prompts]
    ref = ModelResolver(f.tracker, MODEL, f.store.root).ref_for_artifact(f.canary_aid)
    canary_model, tokenizer = load_verified(ref)
    for prompt, rec in zip(prompts, records, strict=True):
        entry, shadow = logged(f, [rec["request_id"]])[rec["request_id"]][0], rec["shadow"]
        assert entry["shadow"] == shadow and RequestLogEntry.model_validate(entry).shadow.arm == "canary"
        assert (entry["arm"], entry["model_version"], entry["arm_reason"]) == (
            "production",
            f.prod_version,
            "shadow: production answers, canary shadows",
        )
        assert (shadow["model_version"], shadow["artifact_id"], shadow["content_hash"]) == (
            f.canary_version,
            f.canary_aid,
            f.canary_hash,
        )
        assert shadow["output_ids"] == greedy_generate(canary_model, tokenizer, prompt, TOKENS)["output_ids"]
        assert shadow["identical"] == (shadow["output_ids"] == entry["output_ids"])
        assert shadow["prefix_agreement"] == prefix_agreement(entry["output_ids"], shadow["output_ids"])
        assert shadow["latency_s"] > 0 and shadow["refused"] is False and shadow["error"] is None
    assert {r["shadow"]["identical"] for r in records} == {True, False}, "int8 moves some of these prompts"

    with canary_alias(f, f.base_version):  # the base: the very bytes production (identity) serves
        same = [server.generate(p, max_new_tokens=TOKENS) for p in prompts[:2]]
    assert all(r["shadow"]["content_hash"] == r["content_hash"] for r in same)
    assert all(r["shadow"]["identical"] and r["shadow"]["prefix_agreement"] == 1.0 for r in same)
    assert same[0]["canary_changed"] == f"v{f.canary_version}->v{f.base_version}"

    critical = server.generate("critical: base answers, nothing shadows", max_new_tokens=TOKENS, critical=True)
    assert (critical["arm"], critical["arm_reason"], critical["served_by"], critical["shadow"]) == (
        "base",
        "critical flag",
        "base",
        None,
    )


# -- budgets, validation, timeout over HTTP ---------------------------------------------------------------
def test_over_budget_requests_are_refused_400_and_logged_once_as_over_budget(fleet, budgeted):
    f = fleet
    with HttpFrontend(budgeted) as front:
        url = f"{front.url}/v1/generate"
        long_prompt = call(url, {"prompt": "word " * 300, "request_id": "budget-prompt"})
        many_tokens = call(url, {"prompt": "short", "max_new_tokens": 9, "request_id": "budget-new"})
        within = call(url, {"prompt": "short", "request_id": "budget-ok"})
    assert long_prompt[0] == many_tokens[0] == 400 and within[0] == 200
    assert "max_prompt_tokens" in long_prompt[1]["error"] and "budget of 256" in long_prompt[1]["error"]
    assert "max_new_tokens 9 is over this server's budget of 8" in many_tokens[1]["error"]
    lines = logged(f, ["budget-prompt", "budget-new", "budget-ok"])
    assert {rid: [e["status"] for e in entries] for rid, entries in lines.items()} == {
        "budget-prompt": ["over_budget"],
        "budget-new": ["over_budget"],
        "budget-ok": ["ok"],
    }
    refused = lines["budget-prompt"][0]
    assert refused["prompt_tokens"] > 256 and refused["output"] is None and refused["arm"] is None
    assert refused["budget"] == {"max_prompt_tokens": 256, "max_new_tokens": 8}
    assert lines["budget-ok"][0]["decoding"]["max_new_tokens"] == 8  # the budget is the default


def test_a_declared_schema_or_tool_is_checked_by_the_suite_validators_and_logged(fleet, budgeted):
    f = fleet
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    item = next(
        json.loads(line)
        for line in (PACKAGE_DIR / "evals" / "generation_v1.jsonl").read_text().splitlines()
        if '"tool_call"' in line
    )
    with HttpFrontend(budgeted) as front:
        url = f"{front.url}/v1/generate"
        with_schema = call(url, {"prompt": "Where? Answer as JSON.", "max_new_tokens": TOKENS, "schema": schema})[1]
        with_tool = call(url, {"prompt": item["prompt"], "max_new_tokens": TOKENS, "tool": item["tool"]})[1]
        bad = call(url, {"prompt": "x", "schema": {"type": 5}, "request_id": "bad-schema"})
        both = call(url, {"prompt": "x", "schema": schema, "tool": item["tool"]})
        unknown = call(url, {"prompt": "x", "temperature": 0.7})
    ok, reason = check_json_format(with_schema["output"], schema)
    assert with_schema["validation"] == {"kind": "schema", "valid": ok, "error": None if ok else reason}
    ok, reason = check_tool_call(with_tool["output"], item["tool"])
    assert with_tool["validation"] == {"kind": "tool", "valid": ok, "error": None if ok else reason}
    entries = logged(f, [with_schema["request_id"], with_tool["request_id"], "bad-schema"])
    assert entries[with_schema["request_id"]][0]["validation"] == with_schema["validation"]
    assert entries[with_tool["request_id"]][0]["validation"]["kind"] == "tool"
    assert bad[0] == both[0] == unknown[0] == 400 and "not a valid JSON Schema" in bad[1]["error"]
    assert "either `schema` or `tool`" in both[1]["error"] and "temperature" in unknown[1]["error"]
    assert "bad-schema" not in entries, "a malformed request runs no model and is not logged"


def test_a_request_past_its_deadline_is_answered_504_and_logged_as_timeout(fleet):
    f = fleet
    server = serve(f, request_timeout_s=0.001)
    with pytest.raises(RequestTimeout, match="request_timeout_s"):
        server.generate("too slow for a millisecond", max_new_tokens=64, request_id="late-1")
    with HttpFrontend(server) as front:
        code, body = call(f"{front.url}/v1/generate", {"prompt": "late", "max_new_tokens": 64, "request_id": "late-2"})
    assert (code, body["status"]) == (504, "timeout")
    for rid, entries in logged(f, ["late-1", "late-2"]).items():
        assert [e["status"] for e in entries] == ["timeout"] and entries[0]["output"] is None, rid


# -- the canary alias, re-read per request ----------------------------------------------------------------
def test_moving_or_removing_the_canary_alias_takes_effect_on_the_next_request(fleet, all_canary):
    f, server = fleet, all_canary
    first = server.generate("all traffic to the canary", max_new_tokens=TOKENS)
    try:
        f.tracker.set_alias(MODEL, "canary", f.base_version)
        moved = server.generate("the canary moved", max_new_tokens=TOKENS)
        f.tracker.client().delete_registered_model_alias(MODEL, "canary")
        removed = server.generate("the canary is gone", max_new_tokens=TOKENS)
    finally:
        f.tracker.set_alias(MODEL, "canary", f.canary_version)
    back = server.generate("the canary is back", max_new_tokens=TOKENS)
    assert (first["arm"], first["model_version"], first["served_by"]) == ("canary", f.canary_version, "quantized")
    assert (moved["arm"], moved["model_version"], moved["served_by"]) == ("canary", f.base_version, "base")
    assert moved["canary_changed"] == f"v{f.canary_version}->v{f.base_version}"
    assert (removed["arm"], removed["model_version"], removed["arm_reason"]) == (
        "production",
        f.prod_version,
        "no canary alias",
    )
    assert removed["canary_changed"] == f"v{f.base_version}->none"
    assert (back["arm"], back["model_version"], back["canary_changed"]) == ("canary", f.canary_version,
                                                                            f"none->v{f.canary_version}")  # fmt: skip


def test_an_unapproved_canary_never_answers_production_does_and_the_log_says_why(fleet, all_canary, shadowing):
    f, split, shadow = fleet, all_canary, shadowing
    with canary_alias(f, f.pending_version):  # what a click in the MLflow UI does
        rec = split.generate("the canary is not signed off", max_new_tokens=TOKENS)
        shadowed = shadow.generate("nor in shadow mode", max_new_tokens=TOKENS)
    assert (rec["status"], rec["arm"], rec["model_version"], rec["fallback"]) == (
        "ok",
        "production",
        f.prod_version,
        True,
    )
    assert "not approved" in rec["fallback_reason"] and "cannot serve: production answers" in rec["arm_reason"]
    assert shadowed["status"] == "ok" and shadowed["model_version"] == f.prod_version
    assert shadowed["shadow"]["output"] is None and "not approved" in shadowed["shadow"]["error"]


# -- the CLI ----------------------------------------------------------------------------------------------
def test_cli_serve_http_answers_on_loopback_and_drains_on_sigterm(fleet, tmp_path, monkeypatch, capsys):
    import os
    import signal

    f = fleet
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", f.tracker.tracking_uri)
    monkeypatch.setenv("QP_STORE_DIR", str(f.store.root))
    config = tmp_path / "serving.yaml"
    config.write_text("canary_share: 1.0\nmax_new_tokens: 8\n")
    port, result = free_port(), {}

    def client() -> None:
        deadline = time.monotonic() + 120
        while True:
            try:
                result["health"] = call(f"http://127.0.0.1:{port}/healthz", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        result["answer"] = call(
            f"http://127.0.0.1:{port}/v1/generate", {"prompt": "over the CLI", "request_id": "cli-1"}
        )
        os.kill(os.getpid(), signal.SIGTERM)  # the handler is installed before the server accepts

    thread = threading.Thread(target=client)
    thread.start()
    code = main(["serve", "--http", "--port", str(port), "--config", str(config), "--model-name", MODEL])
    thread.join(30)
    assert code == 0 and result["health"][0] == 200
    status, body = result["answer"]
    assert (status, body["arm"], body["model_version"]) == (200, "canary", f.canary_version)
    out = capsys.readouterr().out
    assert f"at http://127.0.0.1:{port}" in out and "drained and stopped" in out
    assert [e["status"] for e in logged(f, ["cli-1"])["cli-1"]] == ["ok"]
