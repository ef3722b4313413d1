"""On a GPU: both stages end to end on CUDA, stage one's device memory, NCCL under torchrun, the benchmarks.

Run with ``pytest -m gpu`` (``make test PYTEST_ARGS="-m gpu"``); deselected by default and skipped
where there is no CUDA device; the torchrun tests need two. The CPU-side checks of the same
points are tests/pipeline/test_runtime.py and tests/stages/test_device_paths.py (whose checks
also run on CUDA under ``-m gpu``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.pipeline import tasks
from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.models import ModelConfig, load_model
from distill.stages import generate as generate_stage
from distill.stages.generate import GenerateConfig
from distill.storage import open_store

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

REPO = Path(__file__).resolve().parents[2]
TEACHER = "gpt:vocab_size=4096,d_model=128,n_layers=2,n_heads=4,max_len=128"
STUDENT = "gpt:vocab_size=4096,d_model=64,n_layers=1,n_heads=2,max_len=128"


def run(*args):
    result = CliRunner().invoke(cli, [*map(str, args)])
    if result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


def _ids(path, n=64, vocab=4096, seed=0):
    """Token-id sequences of 20 to 128 tokens (padded batches)."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(vocab, (int(torch.randint(20, 129, (1,), generator=g)),),
                                        generator=g).tolist()} for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _decoded(url):
    return open_store(str(url)).read_all()


def test_both_stages_and_evaluate_on_cuda_agree_with_the_cpu(tmp_path):
    """generate-labels (auto: bf16 teacher, float32 output layer), train-student and evaluate on CUDA."""
    data = _ids(tmp_path / "ids.jsonl")
    common = ["--teacher", TEACHER, "--data", data, "--task", "causal-lm", "--k", 8, "--tail-samples", 16,
              "--examples-per-shard", 16, "--batch-size", 8, "--no-progress"]
    run("generate-labels", *common, "--out", tmp_path / "gpu", "--device", "cuda")
    run("generate-labels", *common, "--out", tmp_path / "cpu", "--device", "cpu")
    gpu, cpu = _decoded(tmp_path / "gpu"), _decoded(tmp_path / "cpu")
    spec = open_store(str(tmp_path / "gpu")).spec
    assert spec.extra["compute_dtype"] == "bfloat16" and spec.extra["logits_dtype"] == "float32"
    assert torch.equal(gpu.offsets, cpu.offsets)
    agree = (gpu.topk_ids == cpu.topk_ids).all(1).double().mean().item()
    assert agree > 0.5, agree  # a bf16 body moves some k-th places; most rows keep their top-k
    torch.testing.assert_close(gpu.tail_logprob.exp(), cpu.tail_logprob.exp(), atol=0.05, rtol=0)

    train = ["train-student", "--labels", tmp_path / "gpu", "--student", STUDENT, "--data", data, "--task",
             "causal-lm", "--steps", 20, "--batch-size", 8, "--log-every", 5, "--no-progress", "--device", "cuda"]
    run(*train, "--out", tmp_path / "student")
    lines = [json.loads(x) for x in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]

    report = json.loads(run("evaluate", "--model", tmp_path / "student", "--data", data, "--task", "causal-lm",
                            "--split", "train", "--labels", tmp_path / "gpu", "--repeats", 2, "--warmup", 1,
                            "--device", "cuda", "--json").output)
    assert report["device"].startswith("cuda") and report["value"] > 1 and report["kl"] >= 0


def test_stage_one_device_memory_is_the_teacher_and_its_logits_plus_a_chunk(tmp_path, monkeypatch):
    """A padded batch on CUDA: peak allocated memory of labelling it is the forward pass plus a few chunks."""
    chunk_rows = 64
    vocab = 4096
    monkeypatch.setattr(tasks, "LOGITS_CHUNK_ELEMENTS", chunk_rows * vocab)
    device = torch.device("cuda", torch.cuda.current_device())
    data = load_data(DataConfig(_ids(tmp_path / "ids.jsonl"), task="causal-lm"))
    teacher = load_model(ModelConfig(TEACHER), device=device)
    config = GenerateConfig(teacher=TEACHER, data="unused", out="unused", device=str(device), k=8, tail_samples=16)
    spec = generate_stage.store_spec(config, teacher, data, device, False)
    host = data.collate([data[i] for i in range(16)])
    batch = {k: v.to(device) for k, v in host.items()}
    with torch.inference_mode():
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        teacher.logits(batch)
        forward = torch.cuda.max_memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        labels, ready = generate_stage.batch_labels(config, teacher, host, batch, spec, torch.Generator(device))
        ready.synchronize()
        stage = torch.cuda.max_memory_allocated() - base
    chunk_bytes = chunk_rows * vocab * 4
    assert labels.num_positions == len(host["position_index"])
    assert stage <= forward + 6 * chunk_bytes, (stage - forward) / chunk_bytes


def _torchrun(*args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "distill.cli", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@two_gpus
def test_torchrun_on_two_gpus_labels_and_trains_with_nccl(tmp_path):
    """--device cuda under torchrun: each rank on its own GPU (no "Duplicate GPU detected"), stage one's store
    equal to one process's (fp32), stage two through DDP on NCCL."""
    data = _ids(tmp_path / "ids.jsonl")
    common = ["--teacher", TEACHER, "--data", data, "--task", "causal-lm", "--k", 8, "--tail-samples", 0,
              "--examples-per-shard", 8, "--batch-size", 8, "--precision", "fp32"]  # with progress: the status lines
    run("generate-labels", *common, "--out", tmp_path / "one", "--device", "cuda:0")
    proc = _torchrun("generate-labels", *common, "--out", tmp_path / "two", "--device", "cuda")
    assert "for worker 0 of 2" in proc.stderr
    one, two = _decoded(tmp_path / "one"), _decoded(tmp_path / "two")
    assert torch.equal(one.topk_ids, two.topk_ids)
    torch.testing.assert_close(one.topk_logprobs, two.topk_logprobs, atol=1e-5, rtol=0)

    _torchrun("train-student", "--labels", tmp_path / "two", "--student", STUDENT, "--data", data, "--task",
              "causal-lm", "--steps", 10, "--batch-size", 4, "--eval-split", "train", "--no-progress",
              "--device", "cuda", "--out", tmp_path / "ddp")
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["metrics"]["eval"]["perplexity"] > 1


@pytest.mark.parametrize("script", ["generate", "train"])
def test_the_speed_benchmarks_run_on_cuda(script):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--quick", "--device", "cuda"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["machine"]["cuda"]
