"""benchmarks/reduction.py at a tiny shape: every setting and kind of logits timed by both paths, figures positive."""

import importlib.util
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_reduction_benchmark_times_every_setting_on_both_kinds_of_logits(capsys):
    spec = importlib.util.spec_from_file_location("reduction_bench", REPO / "benchmarks" / "reduction.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    before = os.environ.get("DISTILL_NATIVE")
    bench.main(["--shape", "8", "8192", "--rounds", "2"])  # V >= 4 * 48 * 32: the tail draws' block search
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["benchmark"] == "reduction" and (out["positions"], out["vocab_size"]) == (8, 8192)
    assert set(out["settings"]) == {f"{s}/{kind}" for s in ("k4_draws48", "k64_draws48", "k64")
                                    for kind in ("lm", "below_zero")}
    for row in out["settings"].values():
        assert all(row[path]["ms"] > 0 and row[path]["ns_per_logit"] > 0 for path in ("compiled", "torch"))
        assert row["speedup"] > 0
    assert os.environ.get("DISTILL_NATIVE") == before  # the benchmark puts the switch back
