"""`distill evaluate` holds the models' own logits plus a bounded chunk of (positions x vocabulary) work.

Measured on the CPU with ``PeakMemory`` (tensor storages alive at once), on a tiny causal LM
with a large vocabulary and a padded batch, so that the (P, V) terms dominate everything else.
Before chunking, the pass peaked at three to four (P, V) float32 copies (the selected positions'
logits, a float copy of them, their softmaxes; the teacher's too); now at the models' own
(B, L, V) logits plus two to four chunks, however many positions a batch has.
"""

import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.pipeline import tasks
from distill.pipeline.data import ExampleSet
from distill.pipeline.models import ModelConfig, load_model
from distill.stages.evaluate import EvaluateConfig, evaluate_model

V = 4096
LENGTHS = [32, 20, 9, 25]  # one batch of four, padded to 32 tokens: 82 positions with a target
CHUNK = 16 * V  # 16 positions scored at a time
MODEL = f"gpt:vocab_size={V},d_model=16,n_layers=1,n_heads=2,max_len=32"
TEACHER = MODEL + ",seed=1"
DATA = "test_evaluate_memory:padded_data"


def padded_data(split: str = "test") -> ExampleSet:
    g = torch.Generator().manual_seed(0)
    return ExampleSet("causal-lm", input_ids=torch.randint(V, (sum(LENGTHS),), generator=g), lengths=LENGTHS,
                      vocab_size=V)


def peak_memory():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, where devicehelp lives
    from devicehelp import PeakMemory

    return PeakMemory()


def weight_bytes(spec: str) -> int:
    return sum(p.numel() * p.element_size() for p in load_model(ModelConfig(spec), device="cpu").module.parameters())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "labels"
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # DATA's module, also under --import-mode=importlib
    result = CliRunner().invoke(cli, ["generate-labels", "--teacher", TEACHER, "--data", DATA, "--out", str(out),
                                      "--k", "8", "--tail-samples", "0", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    return str(out)


def evaluate(against: str, store: str, chunk_elements: int, monkeypatch) -> tuple[dict, int]:
    """(the report, its peak bytes beyond the weights and the models' own (B, L, V) logits)."""
    monkeypatch.setattr(tasks, "LOGITS_CHUNK_ELEMENTS", chunk_elements)
    config = EvaluateConfig(model=MODEL, data=DATA, teacher=TEACHER if against == "teacher" else None,
                            labels=store if against == "store" else None, batch_size=len(LENGTHS),
                            throughput_batch=1, warmup=0, repeats=1, min_timing_s=0, device="cpu")
    with peak_memory() as memory:
        report = evaluate_model(config)
    models = 2 if against == "teacher" else 1
    logits = len(LENGTHS) * max(LENGTHS) * V * 4  # float32 (B, L, V)
    return report, memory.peak - models * (logits + weight_bytes(MODEL))


@pytest.mark.parametrize("against", ["nothing", "teacher", "store"])
def test_evaluation_holds_the_logits_and_a_few_chunks(against, store, monkeypatch):
    chunked, extra = evaluate(against, store, CHUNK, monkeypatch)
    whole, whole_extra = evaluate(against, store, 1 << 25, monkeypatch)  # all 82 positions in one chunk
    chunks = extra / (CHUNK * 4)
    print(f"{against}: {chunks:.2f} chunks beyond weights and logits; in one chunk {whole_extra / (82 * V * 4):.2f} "
          "(P, V) copies")
    assert chunks < {"nothing": 3, "teacher": 5, "store": 5}[against], chunks
    assert extra < 82 * V * 4 < whole_extra  # less than one (P, V) float32 copy; in one chunk, more
    assert chunked["positions"] == whole["positions"] == 82
    assert chunked["value"] == pytest.approx(whole["value"], rel=1e-6)
    assert chunked["ece"] == pytest.approx(whole["ece"], rel=1e-5, abs=1e-7)
    if against != "nothing":
        assert chunked["agreement"] == whole["agreement"]
        assert chunked["kl"] == pytest.approx(whole["kl"], rel=1e-5)
    if against == "teacher":
        assert chunked["teacher_value"] == pytest.approx(whole["teacher_value"], rel=1e-6)
