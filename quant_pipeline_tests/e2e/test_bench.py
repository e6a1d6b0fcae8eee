"""`make bench-candidates`: what `make demo` runs, cold, in a world of its own, with per-candidate figures."""

import re

from quant_pipeline.cli.bench import main as bench
from quant_pipeline_tests.support import LENIENT, cli_home


def test_the_candidates_bench_runs_cold_and_prints_each_candidates_wall_time_size_and_worst_regression(
    tmp_path, tiny_llama, capsys, monkeypatch
):
    policy = tmp_path / "lenient.yaml"
    policy.write_text(LENIENT)
    monkeypatch.setenv("QP_MODEL", str(tiny_llama))
    monkeypatch.setenv("QP_EVAL_MAX_NEW_TOKENS", "16")
    with cli_home(tmp_path) as (store, _):  # the user's own world: the bench must leave it untouched
        code = bench(
            ["--candidates", "identity,torchao-int8-weight", "--eval-limit", "4", "--policy-file", str(policy)]
        )
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {
        m[0]: m
        for m in re.findall(r"^\| (\S+) \| (PASS|FAIL|INCOMPLETE|UNVERIFIED) \| (\d+) \| ([\d.]+) \|", out, re.M)
    }
    assert set(rows) == {"identity", "torchao-int8-weight"}, out
    assert float(rows["torchao-int8-weight"][3]) < float(rows["identity"][3])  # int8 is smaller than the copy
    assert re.search(r"whole comparison: \d+ s wall for 2 candidates \(exit 0\)", out)
    assert not (store.root / "artifacts").exists()  # a cold store of its own, not the user's
