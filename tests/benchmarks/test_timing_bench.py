"""benchmarks/timing.py at tiny settings: two real `distill evaluate` processes, figures positive, spreads from the runs."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("timing_bench", REPO / "benchmarks" / "timing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two real evaluate processes: about 15 s
def test_timing_benchmark_reports_drift_runs_and_their_spread(capsys):
    threads = torch.get_num_threads()
    load_bench().main(["--drift-s", "0.3", "--window", "0.1", "--runs", "2", "--probe-s", "0.05",
                       "--min-timing-s", "0.01"])
    assert torch.get_num_threads() == threads  # the drift workload's one thread is not left behind
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert set(out) == {"benchmark", "drift", "runs", "spread", "settings"} and out["benchmark"] == "timing"

    drift = out["drift"]
    assert len(drift["windows_ms"]) >= 2 and all(w > 0 for w in drift["windows_ms"])
    assert drift["min_ms"] == min(drift["windows_ms"]) and drift["max_ms"] == max(drift["windows_ms"])
    assert drift["max_over_min"] == pytest.approx(drift["max_ms"] / drift["min_ms"], abs=1e-4)
    assert drift["others_cpu_share"] is None or 0 <= drift["others_cpu_share"] <= 1

    runs = out["runs"]
    assert len(runs) == 2 and sum(line.startswith("run ") for line in lines) == 2
    for run in runs:
        assert set(run) == set(out["spread"]) | {"others_cpu_share"}
        assert all(run[name] > 0 for name in out["spread"]), run
        assert run["others_cpu_share"] is None or 0 <= run["others_cpu_share"] <= 1
        assert run["speedup"] == pytest.approx(run["teacher_latency_ms"] / run["student_latency_ms"], abs=1e-4)
    for name, value in out["spread"].items():
        figures = [run[name] for run in runs]
        assert value == pytest.approx(max(figures) / min(figures) - 1, abs=1e-4), name
    assert out["settings"]["runs"] == 2 and out["settings"]["min_timing_s"] == 0.01
