"""benchmarks/gpu.py: skips cleanly where there is no CUDA device (it is run for its figures where there is one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_skips_without_cuda(tmp_path):
    no_cuda = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # as on a CPU-only machine, even where a GPU is lent
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=no_cuda)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "skipped" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"benchmark": "gpu", "skipped": True, "reason": "no CUDA device"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_benchmark_runs_both_stages_on_cuda(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--quick", "--no-memory"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["skipped"] is False and out["machine"]["cuda"]
    for name in ("generate", "train"):
        assert out[name]["benchmark"] == name and out[name]["machine"]["cuda"], out[name]
        assert all(w["precision"] == "bf16" and w["device"].startswith("cuda") for w in out[name]["workloads"].values())
