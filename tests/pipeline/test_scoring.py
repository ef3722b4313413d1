"""The task metric and its calibration, against naive float64 references."""

import contextlib
import json
import math
import socket
from pathlib import Path

import pytest
import torch

from distill.pipeline.data import ExampleSet
from distill.pipeline.models import ModelConfig, load_model
from distill.pipeline.runtime import Workers
from distill.pipeline.scoring import Score, held_out_evaluator
from distill.pipeline.tasks import Positions, chunk_spans, position_logits

CPU = torch.device("cpu")


def test_score_ece_matches_a_naive_float64_reference():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64) * 3
    hard = torch.randint(0, 7, (500,), generator=g)
    hard[::9] = -100  # ignored positions take no part
    score = Score()
    for a in range(0, 500, 64):
        score.add(logits[a : a + 64].float(), hard[a : a + 64])
    keep = hard != -100
    probs = logits[keep].softmax(-1)
    confidence, predicted = probs.max(-1)
    right = (predicted == hard[keep]).double()
    ece = 0.0
    for b in range(15):
        inside = (confidence >= b / 15) & ((confidence < (b + 1) / 15) if b < 14 else (confidence <= 1))
        if inside.any():
            ece += float((right[inside].mean() - confidence[inside].mean()).abs()) * int(inside.sum()) / int(keep.sum())
    result = score.result("classification")
    assert result["ece"] == pytest.approx(ece, abs=1e-6) and result["ece"] > 0.01
    assert result["value"] == pytest.approx(float(right.mean()))


def naive_score(logits: torch.Tensor, hard: torch.Tensor, bins: int = 15) -> dict:
    """Loss, accuracy and ECE of (P, V) logits in float64, straight from the definitions."""
    keep = hard != -100
    logprobs = logits[keep].double().log_softmax(-1)
    target = hard[keep]
    loss = float(-logprobs[torch.arange(len(target)), target].mean())
    confidence, predicted = logprobs.exp().max(-1)
    right = (predicted == target).double()
    ece = 0.0
    for b in range(bins):
        inside = (confidence >= b / bins) & ((confidence < (b + 1) / bins) if b < bins - 1 else (confidence <= 1))
        if inside.any():
            ece += float((right[inside].mean() - confidence[inside].mean()).abs()) * int(inside.sum()) / len(target)
    return {"loss": loss, "accuracy": float(right.mean()), "ece": ece, "positions": len(target)}


def random_positions(seed: int, positions: int = 300, vocab: int = 100):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(positions, vocab, generator=g) * 4  # peaked enough to fill many confidence bins
    hard = torch.randint(0, vocab, (positions,), generator=g)
    hard[torch.rand(positions, generator=g) < 0.2] = -100
    return logits, hard


def test_chunked_score_matches_a_naive_float64_reference():
    logits, hard = random_positions(0)
    want = naive_score(logits, hard)
    for task in ("classification", "causal-lm"):
        score = Score()
        score.add(logits, hard, chunk_elements=7 * 100)  # chunks of 7 positions
        got = score.result(task)
        assert got["positions"] == want["positions"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
        assert got["ece"] == pytest.approx(want["ece"], abs=1e-6) and got["ece"] > 0.01
        value = math.exp(want["loss"]) if task == "causal-lm" else want["accuracy"]
        assert got["value"] == pytest.approx(value, rel=1e-6)


def test_chunk_spans_cover_the_positions_once():
    assert list(chunk_spans(10, 100, 300)) == [slice(0, 3), slice(3, 6), slice(6, 9), slice(9, 10)]
    assert list(chunk_spans(3, 10**6, 1)) == [slice(0, 1), slice(1, 2), slice(2, 3)]  # at least one a chunk
    assert list(chunk_spans(0, 100)) == []


def test_merged_scores_equal_one_score_over_all_positions():
    logits, hard = random_positions(1)
    whole, first, second, empty = Score(), Score(), Score(), Score()
    whole.add(logits, hard)
    first.add(logits[:110], hard[:110])
    second.add(logits[110:], hard[110:])
    merged, want = empty.merge(first).merge(second).merge(Score()).result("causal-lm"), whole.result("causal-lm")
    assert merged.pop("metric") == want.pop("metric") == "perplexity"
    assert merged == pytest.approx(want, rel=1e-12)
    assert Score().merge(Score()).result("classification") == {"metric": "accuracy", "value": None, "positions": 0}


def padded_batch(seed: int, vocab: int = 50):
    lengths = [7, 3, 5, 1]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (sum(lengths),), generator=g)
    mask = torch.rand(sum(lengths), generator=g) < 0.7
    data = ExampleSet("causal-lm", input_ids=ids, lengths=lengths, position_mask=mask, vocab_size=vocab)
    return data, data.collate([data[i] for i in range(len(data))])


def test_positions_in_chunks_are_the_position_logits(models):
    model = models[0]
    _, batch = padded_batch(2)
    with torch.inference_mode():
        want_logits, want_hard = position_logits(model, batch, "causal-lm")  # (P, V), (P,)
        logits = model.logits(batch)  # (B, L, V)
    kept = Positions.of(batch, "causal-lm", CPU)
    assert kept.index is not None and len(kept) == len(want_hard) < batch["input_ids"].numel()
    spans = list(kept.spans(logits.shape[-1], 2 * 64))
    assert len(spans) > 1
    assert torch.equal(torch.cat([kept.rows(logits, s) for s in spans]), want_logits)
    assert torch.equal(kept.hard, want_hard)


def gpt(seed: int):
    return load_model(ModelConfig(f"gpt:vocab_size=50,d_model=16,n_layers=1,n_heads=2,max_len=16,seed={seed}"),
                      device="cpu")


@pytest.fixture(scope="module")
def models():
    return gpt(0), gpt(1)


def held_out(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 16, (23,), generator=g).tolist()
    return ExampleSet("causal-lm", input_ids=torch.randint(50, (sum(lengths),), generator=g), lengths=lengths,
                      vocab_size=50)


def test_held_out_evaluator_is_the_same_in_chunks(models):
    data = held_out()
    with torch.inference_mode():
        whole = held_out_evaluator(models[0], data, 5, CPU, contextlib.nullcontext)()
        chunked = held_out_evaluator(models[0], data, 5, CPU, contextlib.nullcontext, chunk_elements=64 * 3)()
    targets = sum(len(data[i]["input_ids"]) - 1 for i in range(len(data)))  # the last token has none
    assert whole["positions"] == chunked["positions"] == targets
    assert chunked == pytest.approx(whole, rel=1e-6)


def test_ranks_score_disjoint_shares_that_sum_to_the_whole_set(models, monkeypatch):
    shares = []
    monkeypatch.setattr(Score, "all_reduce", lambda score, device: shares.append(score) or score)
    data = held_out()
    with torch.inference_mode():
        alone = held_out_evaluator(models[0], data, 5, CPU, contextlib.nullcontext)()
        parts = [held_out_evaluator(models[0], data, 5, CPU, contextlib.nullcontext, Workers(rank, 3, True))()
                 for rank in range(3)]
    assert len(shares) == 3 and 0 < parts[0]["positions"] < alone["positions"]
    assert sum(p["positions"] for p in parts) == alone["positions"]
    merged = Score().merge(shares[0]).merge(shares[1]).merge(shares[2]).result("causal-lm")
    assert merged["loss"] == pytest.approx(alone["loss"], rel=1e-12)
    assert merged["ece"] == pytest.approx(alone["ece"], rel=1e-12)


def _rank_evaluates(rank: int, world: int, port: int, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with torch.inference_mode():
            result = held_out_evaluator(gpt(0), held_out(), 5, CPU, contextlib.nullcontext,
                                        Workers(rank, world, True))()
        Path(out, f"{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two processes start and import torch: about 10 s, more on a busy machine
def test_each_rank_scores_a_share_and_all_return_the_whole_set(models, tmp_path):
    torch.multiprocessing.spawn(_rank_evaluates, args=(2, free_port(), str(tmp_path)), nprocs=2)
    with torch.inference_mode():
        alone = held_out_evaluator(models[0], held_out(), 5, CPU, contextlib.nullcontext)()
    for rank in range(2):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["positions"] == alone["positions"]
        assert got == pytest.approx(alone, rel=1e-9)
