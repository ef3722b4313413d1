"""On a GPU: a traced (Hugging Face) student quantized for CUDA runs there, one traced on the CPU runs on the CPU.

Run with ``pytest -m gpu``; deselected by default, and skipped where there is no CUDA device.
"""

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli

# the offline builders of tiny Hugging Face models, tokenizers and data live beside the pipeline tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline"))

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FAST = ["--repeats", 2, "--warmup", 1, "--throughput-batch", 8]


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [*map(str, args)])
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


def evaluate(model, *args) -> dict:
    return json.loads(run("evaluate", "--model", model, *args, *FAST, "--json").output)


def test_a_student_traced_for_cuda_runs_there_and_one_traced_on_the_cpu_runs_on_the_cpu(tmp_path):
    from datahelp import SENTENCES, make_hf_tokenizer, write_jsonl
    from modelhelp import make_hf_causal_lm

    student = make_hf_causal_lm(tmp_path / "student", vocab=300)
    make_hf_tokenizer(student, vocab_size=300)
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES * 3])
    text = ["--data", data, "--tokenizer", student, "--seq-len", 32]
    traced = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / f"q-{device}"
        summary = json.loads(run("quantize", "--model", student, "--out", out, "--method", "weight-only-int8",
                                 "--device", device, *text, "--json").output)
        assert summary["export"] == "trace"
        traced[device] = (out, summary["traced_on"])
    assert traced["cuda"][1] == f"cuda:{torch.cuda.current_device()}" and traced["cpu"][1] == "cpu"
    on_cpu, on_gpu = traced["cpu"][0], traced["cuda"][0]
    text.extend(["--split", "train"])

    reference = evaluate(on_cpu, *text, "--device", "cpu")
    gpu = evaluate(on_gpu, *text, "--device", "auto", "--precision", "fp32")
    assert gpu["device"] == traced["cuda"][1] and gpu["positions"] == reference["positions"]
    assert gpu["value"] == pytest.approx(reference["value"], rel=1e-3)
    bf16 = evaluate(on_gpu, *text, "--device", "auto")  # bf16 autocast over the traced graph
    assert bf16["value"] == pytest.approx(reference["value"], rel=0.05)

    # the CPU trace on a GPU machine: auto keeps it on the CPU; a GPU asked for, or a GPU trace on the CPU, is refused
    auto = evaluate(on_cpu, *text, "--device", "auto")
    assert auto["device"] == "cpu" and auto["value"] == pytest.approx(reference["value"], rel=1e-6)
    refused = run("evaluate", "--model", on_cpu, *text, "--device", "cuda", ok=False)
    assert refused.exit_code == 2 and "re-quantize it with --device cuda" in refused.stderr
    refused = run("evaluate", "--model", on_gpu, *text, "--device", "cpu", ok=False)
    assert refused.exit_code == 2 and "re-quantize it with --device cpu" in refused.stderr
