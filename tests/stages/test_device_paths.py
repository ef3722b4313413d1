"""What would break or waste a GPU, measured on the CPU: the teacher's output layer under bf16 autocast,
stage one's peak memory, and the host synchronisations of a training step.

A bf16 teacher runs on the CPU as on a GPU (bf16 weights, bf16 autocast); memory is counted per
tensor storage and synchronisations per op (``devicehelp``), so these hold on any machine.
"""

import json

import pytest
import torch

from devicehelp import PeakMemory, SyncCounter
from distill.pipeline import tasks, trainer
from distill.pipeline.architectures import build_builtin
from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.models import ModelConfig, float32_output_layer, load_model
from distill.stages import generate as generate_stage
from distill.stages.generate import GenerateConfig, generate_labels
from distill.stages.train import StudentConfig, TrainConfig, train_student, train_teacher
from distill.storage import open_store

VOCAB = 512
SHARP = "test_device_paths:sharp_gpt"
# each check on the CPU, and (``-m gpu``, where there is one) the same check on CUDA
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])]


def sharp_gpt():
    """A 1-layer GPT whose logits span tens, as a trained LM's do (bf16 steps there are 0.125 to 0.25)."""
    model = build_builtin("gpt", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=2, max_len=64, tie_weights=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(400.0)
    return model


def _ragged_ids(path, n=24, seed=0):
    """A JSONL of token-id sequences of 9 to 40 tokens: batches of them are padded."""
    g = torch.Generator().manual_seed(seed)
    rows = [{"input_ids": torch.randint(VOCAB, (int(torch.randint(9, 41, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _generate(tmp_path, device="cpu", **kw):
    data = _ragged_ids(tmp_path / "ids.jsonl")
    settings = dict(k=8, tail_samples=0, value_encoding="lossless", batch_size=4, examples_per_shard=8) | kw
    config = GenerateConfig(teacher=SHARP, data=data, out=str(tmp_path / "store"), device=device, task="causal-lm",
                            progress=False, **settings)
    generate_labels(config)
    return data, open_store(config.out)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_teacher_stores_log_probs_of_float32_logits(tmp_path, device):
    """Under bf16 weights and autocast the stored log-probs are those of float32 logits of the (bf16) body's
    output: within float32 error of a float64 reference, where bf16-rounded logits are ~1e-1 off.
    On CUDA this is the default precision (auto)."""
    data_spec, store = _generate(tmp_path, device=device, precision="bf16" if device == "cpu" else "auto")
    assert store.spec.extra["compute_dtype"] == "bfloat16" and store.spec.extra["logits_dtype"] == "float32"
    got = store.read_all()

    teacher = load_model(ModelConfig(SHARP, task="causal-lm"), device=device, dtype=torch.bfloat16)  # as stage one
    head_inputs = []
    teacher.module.lm_head.register_forward_hook(lambda m, args, out: head_inputs.append(args[0]))
    data = load_data(DataConfig(data_spec, task="causal-lm"))
    reference, rounded = [], []
    with torch.inference_mode(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        for a in range(0, len(data), 4):  # stage one's batches: shards of 8, batches of 4
            batch = data.collate([data[i] for i in range(a, a + 4)])
            teacher.logits(batch)
            x = head_inputs.pop().double().cpu()  # (B, L, C) the body's output, as the head received it
            logits = (x @ teacher.module.lm_head.weight.double().cpu().T)[batch["position_mask"]]  # (P, V) float64
            reference.append(logits.log_softmax(-1))
            rounded.append(logits.bfloat16().double().log_softmax(-1))  # what bf16 logits would have given
    reference, rounded = torch.cat(reference), torch.cat(rounded)

    assert torch.equal(got.topk_ids, reference.topk(8).indices.sort(1).values)
    error = (got.topk_logprobs.double() - reference.gather(1, got.topk_ids)).abs().max().item()
    rounding = (rounded.gather(1, got.topk_ids) - reference.gather(1, got.topk_ids)).abs().max().item()
    print(f"error {error:.2e}, bf16 rounding {rounding:.2e}")
    assert error < 1e-4 < 1e-2 < rounding, (error, rounding)


def test_the_output_layer_is_float32_whatever_the_weights():
    teacher = load_model(ModelConfig(SHARP, task="causal-lm"), dtype=torch.bfloat16)
    assert float32_output_layer(teacher)
    assert teacher.module.lm_head.weight.dtype == torch.float32
    assert teacher.module.tok_emb.weight.dtype == torch.bfloat16  # untied: the embedding keeps its dtype
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher.logits({"input_ids": torch.zeros(2, 5, dtype=torch.int64)}).dtype == torch.float32


def test_stage_one_holds_the_teachers_logits_and_one_chunk_not_a_padded_copy(tmp_path, monkeypatch):
    """A padded batch's positions are gathered a chunk at a time: peak memory is the teacher's forward pass
    plus a few chunks of (positions x vocabulary), not a second (positions x vocabulary) copy."""
    chunk_rows = 8
    monkeypatch.setattr(tasks, "LOGITS_CHUNK_ELEMENTS", chunk_rows * VOCAB)
    data = load_data(DataConfig(_ragged_ids(tmp_path / "ids.jsonl"), task="causal-lm"))
    teacher = load_model(ModelConfig(SHARP, task="causal-lm"))
    config = GenerateConfig(teacher=SHARP, data="unused", out="unused", device="cpu", k=8, tail_samples=16)
    spec = generate_stage.store_spec(config, teacher, data, torch.device("cpu"), False)
    host = data.collate([data[i] for i in range(8)])
    positions = len(host["position_index"])
    assert positions < host["position_mask"].numel()  # padded

    with torch.inference_mode():
        with PeakMemory() as forward:
            teacher.logits(host)
        with PeakMemory() as stage:
            labels, ready = generate_stage.batch_labels(config, teacher, host, host, spec, torch.Generator())
    assert labels.num_positions == positions and ready is None
    chunk_bytes = chunk_rows * VOCAB * 4
    assert positions * VOCAB * 4 > 10 * chunk_bytes  # a padded copy would show
    print(f"peak beyond the forward pass: {(stage.peak - forward.peak) / chunk_bytes:.2f} chunks")
    assert stage.peak <= forward.peak + 5 * chunk_bytes, (stage.peak - forward.peak) / chunk_bytes


@pytest.fixture
def counted_fit(monkeypatch, request):
    """Counts syncing ops in ``fit``: batches load in a worker process, and the one metrics line and
    checkpoint come at the last step (which the count includes).

    AdamW's step is left out: its step counters are host tensors (torch keeps them on the CPU
    unless ``capturable`` or ``fused``), so the scalars it reads never wait for a GPU; the
    DataLoader's per-epoch seed is likewise drawn on the host.
    """
    counter = SyncCounter()
    cuda = torch.cuda.is_available() and "cuda" in request.node.name

    def count(on: bool) -> None:
        counter.counting = on
        if cuda:  # and on a GPU, torch itself raises at any synchronisation in a counted stretch
            torch.cuda.set_sync_debug_mode("error" if on else "default")

    def paused(fn):
        def wrapper(*args, **kwargs):
            count(False)
            try:
                return fn(*args, **kwargs)
            finally:
                count(True)
        return wrapper

    monkeypatch.setattr(torch.optim.AdamW, "step", paused(torch.optim.AdamW.step))
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", paused(torch.utils.data.DataLoader.__iter__))
    real_fit = trainer.fit

    def fit(*args, **kwargs):
        with counter:
            count(True)
            try:
                return real_fit(*args, **kwargs)
            finally:
                count(False)

    monkeypatch.setattr("distill.stages.train.fit", fit)
    return counter


@pytest.mark.parametrize("device", DEVICES)
def test_a_training_step_never_waits_for_the_device(tmp_path, counted_fit, device):
    """No ``.item()``/``float()``, ``nonzero`` or boolean-mask indexing in a step of train-student (padded
    causal-LM batches, tail draws, hard labels mixed in) or train-teacher: the host runs ahead of the GPU."""
    counter = counted_fit
    data, store = _generate(tmp_path, tail_samples=16, k=4)
    common = dict(data=data, model="gpt:vocab_size=512,d_model=16,n_layers=1,n_heads=2,max_len=64", device=device,
                  batch_size=4, steps=6, log_every=100, checkpoint_every=100, workers=1, progress=False,
                  task="causal-lm")
    student = train_student(StudentConfig(labels=str(tmp_path / "store"), out=str(tmp_path / "student"), alpha=0.5,
                                          grad_accum=2, **common))
    teacher = train_teacher(TrainConfig(out=str(tmp_path / "teacher"), **common))
    assert student["metrics"]["step"] == teacher["metrics"]["step"] == 6
    assert counter.count == 0, counter.names


def test_more_ranks_than_shards_is_refused_not_an_endless_loop(tmp_path):
    """With --steps, a rank whose share of the store is empty gives epochs of no step: refused up front."""
    from contextlib import nullcontext

    from distill.errors import ConfigError
    from distill.pipeline.runtime import Workers
    from distill.storage.stream import LabelStream

    data_spec, store = _generate(tmp_path, examples_per_shard=24)  # one shard
    assert store.spec.num_shards == 1
    stream = LabelStream(load_data(DataConfig(data_spec, task="causal-lm")), store, batch_size=4, rank=0, world=2)
    place = trainer.RunPlace(str(tmp_path / "run"), Workers(0, 2, False), torch.device("cpu"), nullcontext, False)
    with pytest.raises(ConfigError, match="fewer ranks than the store has shards"):
        trainer.fit(torch.nn.Linear(2, 2), stream, lambda model, batch: {}, trainer.Schedule(steps=3), place)
