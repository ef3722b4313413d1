"""docs/LIBRARY.md's example runs as written; benchmarks/train.py prints its figures, consistent with each other."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def python_blocks(markdown: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown.read_text(), flags=re.S | re.M)


def test_library_example_runs_as_written(tmp_path):
    blocks = python_blocks(REPO / "docs" / "LIBRARY.md")
    assert blocks, "docs/LIBRARY.md has no ```python block"
    script = tmp_path / "example.py"
    script.write_text("\n\n".join(blocks))
    cpu_only = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the example runs on --device auto: the CPU, as here
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env=cpu_only)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"loss ([0-9.]+)", proc.stdout)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), proc.stdout
    assert (tmp_path / "labels.zarr" / "manifest.json").is_file()


def test_train_benchmark_prints_consistent_figures(tmp_path):
    out = train_bench(tmp_path, "--workload", "classifier", "--steps", "3", "--warmup", "1", "--repeats", "1",
                      "--no-memory")
    assert out["benchmark"] == "train" and out["machine"]["cpus"] >= 1

    w = out["workloads"]["classifier"]
    rates = ("ce_steps_per_s", "offline_kd_steps_per_s", "online_kd_steps_per_s", "teacher_forward_s", "student_step_s",
             "student_kd_step_s")
    assert all(w[k] > 0 for k in rates), w
    assert w["stream_overhead_ratio"] == pytest.approx(w["offline_kd_steps_per_s"] / w["ce_steps_per_s"], rel=1e-2)
    assert w["offline_speedup"] == pytest.approx(w["offline_kd_steps_per_s"] / w["online_kd_steps_per_s"], rel=1e-2)
    ideal = (w["teacher_forward_s"] + w["student_step_s"]) / w["student_step_s"]
    assert w["ideal_offline_speedup"] == pytest.approx(ideal, rel=1e-2) and ideal > 1
    assert w["loss_only_ratio"] == pytest.approx(w["student_step_s"] / w["student_kd_step_s"], rel=1e-2)
    assert 8 <= w["param_ratio"] <= 12 and w["steps"] == 3 and len(w["runs"]["ce"]) == 1
    assert out["meets_target"] == (w["stream_overhead_ratio"] >= out["target_stream_overhead_ratio"])


def train_bench(tmp_path, *args) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / "train.py"), *args, "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # about 20 s: train-student twice in subprocesses, on 1x and 10x the data
def test_train_benchmark_memory_line_is_consistent(tmp_path):
    out = train_bench(tmp_path, "--workload", "none", "--memory-examples", "64", "--no-default-buffer")
    m = out["memory"]
    assert m["examples_large"] == 10 * m["examples_small"] and m["positions_large"] == 10 * m["positions_small"]
    assert m["peak_rss_mb_small"] > 0 and m["peak_rss_mb_large"] > 0
    assert m["peak_rss_ratio"] == pytest.approx(m["peak_rss_mb_large"] / m["peak_rss_mb_small"], rel=1e-2)
    assert m["peak_rss_mb_small"] == pytest.approx(m["main_rss_mb_small"] + m["worker_rss_mb_small"], abs=0.2)
