"""Stage-two benchmark: what streaming soft labels from a store costs the student's training.

For each workload, on the same device, with the same student (same initial weights), the
same batches (same examples in the same order) and the same trainer loop
(``distill.pipeline.trainer.fit``, with train-student's default DataLoader workers, ``loader_workers``: none on
a CPU, one on a GPU; ``--workers N`` to choose):

- ``ce_steps_per_s``: `distill train-teacher` on the student, hard labels only (cross-entropy);
- ``offline_kd_steps_per_s``: `distill train-student` (``distill.stages.train.train_student``)
  on a real store written by ``generate_labels`` to a temporary directory: the real
  ``LabelStream``, the real loss (``make_loss``), alpha 0.5 and temperature 2, top-k + tail
  labels (``tail_samples=0``: causal-LM stores otherwise default to tail draws, issue 14);
- ``stream_overhead_ratio = offline / ce`` (target: at least 0.90), the median over rounds of each
  round's ratio (its two runs are seconds apart, so the host's slower drift cancels);
  ``stream_overhead_ratio_of_medians`` is the ratio of the two medians, as reported before;
- ``online_kd_steps_per_s``: what online distillation does: the teacher (about 10 times the
  student's parameters) in memory, one teacher forward pass per step, and the same Hinton
  mix of cross-entropy and T^2 * KL on the teacher's *full* logits;
- ``offline_speedup = offline / online``, next to the ideal
  ``ideal_offline_speedup = (teacher_forward_s + student_step_s) / student_step_s``, from the
  teacher's forward pass alone and the student's training step alone (forward,
  cross-entropy, backward, clipping, AdamW) timed on the same batches held in memory;
- ``loss_only_ratio = student_step_s / student_kd_step_s`` (paired by round likewise): the same in-memory student step
  with train-student's loss on the batches' soft labels instead of cross-entropy, i.e. what
  ``stream_overhead_ratio`` would be if streaming cost nothing: the rest is the stream's.

Every variant runs ``--warmup`` steps (worker start-up, first allocations), then
``--steps`` timed steps (data loading included: the time between the starts of consecutive
steps' losses), then one last step that is not timed. The variants run alternately
``--repeats`` times and the median of each is reported. The classifier times 600 steps a
window (about 2 s): with 100 (0.3 s) one round's ratio ranged from 0.70 to 1.05 over 9
rounds on a shared 2-core host, with 1,000 from 0.84 to 0.96 over 5.

Memory: `distill train-student` (the real CLI, in a subprocess, one epoch, its default
DataLoader workers) on two stores 10 times apart in size, written from LM-shaped data. Each
run's peak RSS is the training process's ``ru_maxrss`` plus its DataLoader worker's if it has one (taken
at exit: ``RUSAGE_SELF`` and ``RUSAGE_CHILDREN``; a worker's counts the pages it shares
with the training process too, so the sum overstates the footprint by the same amount at
both sizes); ``peak_rss_ratio = large / small`` should be about 1: stage two holds the
student, a shuffle buffer and the shards it draws from, never the store. ``memory`` runs
with a shuffle buffer of 64 examples, smaller than both stores, so both runs are past the
bound it sets; ``memory_default_buffer`` (not with ``--quick``) repeats the pair at
train-student's default, 4,096 examples, which the small store does not fill. The data (a
Parquet file of token ids, an ``input_ids`` list column, 10 times apart too) is read a batch
of rows at a time into temporary files and each example's tokens read back when it is
drawn (``distill.pipeline.diskarrays``), so it does not stay in memory either: what grows
with it is per sequence (offsets and labels, 16 bytes each), not per token.

Loss memory (``loss_peak_memory``, with the ``lm`` workload): one forward + backward of the
loss alone on (2,048 x 32,000) float32 logits behind an output layer, alpha 0.5, T 2, top-64 +
tail: the fused top-k loss, the plain one (``fused=False``) and ``F.cross_entropy``, as the
peak bytes of the tensors they allocate (a dispatch mode on the CPU; the allocator's peak on
CUDA). ``fused_ce_ratio`` should be at most 1.1.

Workloads: ``lm``, a causal LM (built-in ``gpt``, vocabulary 4,096, 64-token random
sequences, top-64 labels), student 0.9M and teacher 10M parameters; ``classifier``,
mnist1d-shaped inputs (40 float features, 10 classes, random), student the built-in
``mlp`` (79k parameters) and teacher ``mlp:hidden=864`` (0.79M).

    python benchmarks/train.py [--quick] [--workload lm|classifier|all|none] [--device auto] [--precision auto]

Prints one line per workload, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import weakref
from itertools import islice
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.losses import TopKDistillationLoss, make_loss
from distill.pipeline.models import ModelConfig, load_model
from distill.pipeline.runtime import TRAINING_PRECISIONS, Workers, autocast, resolve_device
from distill.pipeline.tasks import IGNORE_INDEX, position_logits
from distill.pipeline.trainer import RunPlace, Schedule, fit, loader_workers, make_optimizer
from distill.stages.generate import GenerateConfig, generate_labels
from distill.stages.train import StudentConfig, TrainConfig, train_student, train_teacher
from distill.storage import open_store, topk_labels
from distill.storage.stream import LabelStream, labels_from_batch
from peakrss import peak_rss_mb  # benchmarks/peakrss.py, beside this script

TRAIN_STAGE = importlib.import_module("distill.stages.train")
# train-teacher streams runs of this many examples; shards of the same size give the same batches
CHUNK = inspect.signature(LabelStream).parameters["chunk_examples"].default
TEMPERATURE, ALPHA = 2.0, 0.5
WORKERS = None  # train-student's default (loader_workers); --workers sets it

WORKLOADS = {
    # name: student, teacher, output size, sequence length (None: features), k (None: all), batch size,
    # timed steps and warm-up steps (full, quick)
    "lm": dict(student="gpt:vocab_size=4096,d_model=128,n_layers=2,n_heads=4,max_len=64",
               teacher="gpt:vocab_size=4096,d_model=416,n_layers=4,n_heads=8,max_len=64",
               vocab_size=4096, seq_len=64, k=64, batch_size=8, steps=(90, 8), warmup=(3, 2)),
    "classifier": dict(student="mlp", teacher="mlp:hidden=864",
                       vocab_size=10, seq_len=None, k=None, batch_size=256, steps=(600, 30), warmup=(10, 5)),
}
MEMORY = dict(student="gpt:vocab_size=4096,d_model=32,n_layers=1,n_heads=2,max_len=32",
              teacher="gpt:vocab_size=4096,d_model=64,n_layers=1,n_heads=2,max_len=32",
              vocab_size=4096, seq_len=32, k=64, batch_size=32, examples_per_shard=32, shuffle_buffer=64,
              examples=(1024, 128))  # the small store (full, quick); the large one is 10 times bigger

# --- inputs --------------------------------------------------------------------------------

def write_data(name: str, n: int, w: dict, tmp: str) -> str:
    """A Parquet file of seeded random inputs: token ids for an LM, 40 float features and a label for a classifier."""
    rng = np.random.default_rng(0)
    if w["seq_len"] is not None:
        ids = rng.integers(0, w["vocab_size"], size=(n, w["seq_len"]), dtype=np.int64)
        table = pa.table({"input_ids": pa.array(list(ids))})
    else:
        x = rng.standard_normal((n, 40), dtype=np.float32)
        table = pa.table({"inputs": pa.array(list(x)), "label": rng.integers(0, w["vocab_size"], n)})
    path = os.path.join(tmp, f"{name}-{n}.parquet")
    pq.write_table(table, path)
    return path


def write_store(name: str, w: dict, data: str, tmp: str, examples_per_shard: int, device: str,
                precision: str = "auto") -> str:
    out = os.path.join(tmp, f"{name}-store")
    # plain top-k + tail (no tail draws, whatever the task's default): the labels this benchmark has always timed
    generate_labels(GenerateConfig(teacher=w["teacher"], data=data, out=out, k=w["k"], tail_samples=0,
                                   temperatures=(1.0, TEMPERATURE),
                                   examples_per_shard=examples_per_shard, batch_size=64, device=device, progress=False,
                                   overwrite=True, precision=precision))
    return out


def params(spec: str) -> int:
    return sum(p.numel() for p in load_model(ModelConfig(spec)).module.parameters())


# --- the three ways to train: timed through the trainer's own loop -------------------------

def _timed_fit(stamps: list[float]):
    """``fit``, noting when each step's loss starts (steps run back to back, data loading included)."""

    def timed(module, stream, batch_loss, *args, **kwargs):
        def loss(model, batch):
            stamps.append(time.perf_counter())
            return batch_loss(model, batch)

        return fit(module, stream, loss, *args, **kwargs)

    return timed


def _rate(stamps: list[float], warmup: int, steps: int) -> float:
    return steps / (stamps[warmup + steps] - stamps[warmup])


def _common(w: dict, data: str, out: str, total: int, device: str, precision: str = "auto") -> dict:
    return dict(out=out, data=data, model=w["student"], steps=total, batch_size=w["batch_size"], workers=WORKERS,
                device=device, progress=False, precision=precision)


def ce_rate(w: dict, data: str, out: str, warmup: int, steps: int, device: str, precision: str = "auto") -> float:
    """`train-teacher` on the student: hard labels only."""
    stamps: list[float] = []
    with mock.patch.object(TRAIN_STAGE, "fit", _timed_fit(stamps)):
        train_teacher(TrainConfig(**_common(w, data, out, warmup + steps + 1, device, precision)))
    return _rate(stamps, warmup, steps)


def offline_rate(w: dict, data: str, store: str, out: str, warmup: int, steps: int, device: str,
                 precision: str = "auto") -> float:
    """`train-student`: the store streamed through LabelStream, the real distillation loss."""
    stamps: list[float] = []
    with mock.patch.object(TRAIN_STAGE, "fit", _timed_fit(stamps)):
        train_student(StudentConfig(**_common(w, data, out, warmup + steps + 1, device, precision), labels=store,
                                    temperature=TEMPERATURE, alpha=ALPHA))
    return _rate(stamps, warmup, steps)


def _autocast(device: torch.device, precision: str = "auto"):
    """What the training stages' --precision does (auto: bf16 autocast on CUDA, none elsewhere)."""
    return autocast(precision, device)


def dense_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """alpha * CE + (1 - alpha) * T^2 * KL(p_teacher,T || p_student,T) over the full vocabulary; (P, V) logits."""
    s = F.log_softmax(student_logits.float() / TEMPERATURE, -1)  # (P, V)
    t = F.log_softmax(teacher_logits.float() / TEMPERATURE, -1)  # (P, V)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
    ce = F.cross_entropy(student_logits.float(), hard, ignore_index=IGNORE_INDEX)
    return ALPHA * ce + (1 - ALPHA) * TEMPERATURE**2 * kl


def online_rate(w: dict, data_spec: str, out: str, warmup: int, steps: int, device: torch.device,
                precision: str = "auto") -> float:
    """Online distillation: the teacher's forward pass every step, KD on its full logits."""
    teacher = load_model(ModelConfig(w["teacher"]), device=device)
    student = load_model(ModelConfig(w["student"]), device=device)
    data = load_data(DataConfig(data_spec, task=student.task))
    student.module.train()
    stream = LabelStream(data, None, batch_size=w["batch_size"], seed=0,
                         workers=loader_workers(WORKERS, device))  # as train-teacher's

    def loss(model, batch):
        with torch.no_grad():
            target, _ = position_logits(teacher, batch, teacher.task)  # (P, V)
        logits, hard = position_logits(student, batch, student.task, module=model)  # (P, V), (P,)
        value = dense_kd(logits, target, hard)
        return {"loss": value, "positions": len(logits)}

    stamps: list[float] = []
    os.makedirs(out, exist_ok=True)
    schedule = Schedule(steps=warmup + steps + 1, workers=WORKERS)
    place = RunPlace(out, Workers(), device, lambda: _autocast(device, precision), progress=False)
    _timed_fit(stamps)(student.module, stream, loss, schedule, place)
    return _rate(stamps, warmup, steps)


# --- the ideal: the teacher's forward pass and the student's step, alone, on batches in memory ---

class Ideal:
    """The teacher's forward pass and the student's step (hard labels, or the store's soft labels) in memory."""

    def __init__(self, w: dict, data_spec: str, store: str, device: torch.device, n_batches: int,
                 precision: str = "auto"):
        self.precision = precision
        self.teacher = load_model(ModelConfig(w["teacher"]), device=device)
        self.student = load_model(ModelConfig(w["student"]), device=device)
        self.student.module.train()
        self.optimizer = make_optimizer(self.student.module, Schedule())
        data = load_data(DataConfig(data_spec, task=self.student.task))
        reader = open_store(store)
        self.spec = reader.spec
        self.loss = make_loss(self.spec.method, "kl", TEMPERATURE, ALPHA)
        # the first batches every run sees, with the tempered labels worked out ahead as train-student's stream does
        stream = LabelStream(data, reader, batch_size=w["batch_size"], seed=0, temperature=TEMPERATURE)
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in islice(iter(stream), n_batches)]
        self.device = device

    def teacher_forward_s(self, warmup: int) -> float:
        with torch.no_grad(), _autocast(self.device, self.precision):
            return self._seconds(lambda b: position_logits(self.teacher, b, self.teacher.task), warmup)

    def student_step_s(self, warmup: int, soft: bool = False) -> float:
        """Forward, loss (cross-entropy; or train-student's, on the batch's soft labels), backward, clip, AdamW."""

        def step(batch):
            self.optimizer.zero_grad(set_to_none=True)
            with _autocast(self.device, self.precision):
                logits, hard = position_logits(self.student, batch, self.student.task)
                if soft:
                    loss = self.loss(logits, labels_from_batch(batch, self.spec.stored_temperatures), hard)["loss"]
                else:
                    loss = F.cross_entropy(logits.float(), hard, ignore_index=IGNORE_INDEX)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.module.parameters(), 1.0)
            self.optimizer.step()

        return self._seconds(step, warmup)

    def _seconds(self, fn, warmup: int) -> float:
        """Mean seconds per batch over the batches after the first ``warmup``."""
        for b in self.batches[:warmup]:
            fn(b)
        self._sync()
        start = time.perf_counter()
        for b in self.batches[warmup:]:
            fn(b)
        self._sync()
        return (time.perf_counter() - start) / (len(self.batches) - warmup)

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --- one workload --------------------------------------------------------------------------

def run_workload(name: str, quick: bool, device_name: str, repeats: int, tmp: str, steps: int | None,
                 warmup: int | None, examples: int | None, precision: str = "auto") -> dict:
    w = WORKLOADS[name]
    steps = steps or w["steps"][quick]
    warmup = warmup if warmup is not None else w["warmup"][quick]
    total = warmup + steps + 1
    n = examples or total * w["batch_size"]
    if n < total * w["batch_size"]:
        raise SystemExit(f"--examples {n} is too few for {total} steps of {w['batch_size']}: pass at least "
                         f"{total * w['batch_size']}")
    device = resolve_device(device_name)
    data = write_data(name, n, w, tmp)
    store = write_store(name, w, data, tmp, CHUNK, device_name, precision)
    ideal = Ideal(w, data, store, device, warmup + steps, precision)
    runs: dict[str, list[float]] = {k: [] for k in ("ce", "offline", "online", "teacher_forward_s", "student_step_s",
                                                    "student_kd_step_s")}
    for r in range(repeats):
        runs["ce"].append(ce_rate(w, data, os.path.join(tmp, f"{name}-ce-{r}"), warmup, steps, device_name, precision))
        runs["offline"].append(offline_rate(w, data, store, os.path.join(tmp, f"{name}-kd-{r}"), warmup, steps,
                                            device_name, precision))
        runs["online"].append(online_rate(w, data, os.path.join(tmp, f"{name}-online-{r}"), warmup, steps, device,
                                          precision))
        runs["teacher_forward_s"].append(ideal.teacher_forward_s(warmup))
        runs["student_step_s"].append(ideal.student_step_s(warmup))
        runs["student_kd_step_s"].append(ideal.student_step_s(warmup, soft=True))
    med = {k: statistics.median(v) for k, v in runs.items()}
    ce, offline, online = med["ce"], med["offline"], med["online"]
    teacher_s, student_s = med["teacher_forward_s"], med["student_step_s"]
    student_params, teacher_params = params(w["student"]), params(w["teacher"])
    spec = open_store(store).spec
    return {
        "student": w["student"], "teacher": w["teacher"], "student_params": student_params,
        "teacher_params": teacher_params, "param_ratio": round(teacher_params / student_params, 2),
        "examples": n, "batch_size": w["batch_size"], "positions_per_step": w["batch_size"] * (w["seq_len"] or 1),
        "k": spec.k, "vocab_size": spec.vocab_size, "examples_per_shard": spec.examples_per_shard,
        "temperature": TEMPERATURE, "alpha": ALPHA, "workers": loader_workers(WORKERS, device), "device": str(device),
        "precision": precision,
        "steps": steps, "warmup_steps": warmup, "repeats": repeats,
        "ce_steps_per_s": round(ce, 3), "offline_kd_steps_per_s": round(offline, 3),
        "online_kd_steps_per_s": round(online, 3),
        # each round's ratio of two runs a few seconds apart, then their median: the host's drift between rounds
        # (which moved whole runs by 15% here) cancels; the ratio of the medians is kept beside it
        "stream_overhead_ratio": round(_paired(runs["offline"], runs["ce"]), 4),
        "stream_overhead_ratio_of_medians": round(offline / ce, 4), "offline_speedup": round(offline / online, 4),
        "teacher_forward_s": round(teacher_s, 5), "student_step_s": round(student_s, 5),
        "ideal_offline_speedup": round((teacher_s + student_s) / student_s, 4),
        # offline / CE if streaming cost nothing: the distillation loss's own cost against cross-entropy's
        "student_kd_step_s": round(med["student_kd_step_s"], 5),
        "loss_only_ratio": round(_paired(runs["student_step_s"], runs["student_kd_step_s"]), 4),
        "runs": {k: [round(x, 5) for x in v] for k, v in runs.items()},
    }


def _paired(num: list[float], den: list[float]) -> float:
    """The median over rounds of num[r] / den[r]."""
    return statistics.median(a / b for a, b in zip(num, den))


# --- the loss's own peak memory: fused, plain and cross-entropy ------------------------------

LOSS_MEMORY = dict(positions=2048, vocab_size=32000, k=64)


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storages alive at once among those created inside it (as
    tests/devicehelp.py's ``PeakMemory``, but a view or in-place result of a tensor made before it is
    not counted as new): what a caching allocator would have to hold."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self.live and key not in inputs:
                    self.live[key] = size
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def _loss_peak_bytes(fn, hidden: torch.Tensor, head: torch.Tensor, device: torch.device) -> int:
    """Peak bytes allocated by one forward + backward of ``fn(logits)``, beyond the logits themselves, with the
    logits (P, V) = hidden (P, D) @ head (D, V) as behind an output layer (whose backward takes the gradient)."""
    x = hidden.detach().requires_grad_() @ head.detach().requires_grad_()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn(x).backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _PeakBytes() as peak:
        fn(x).backward()
    return peak.peak


def loss_peak_memory(device_name: str = "cpu") -> dict:
    """One forward + backward of each loss on (P, V) float32 logits, alpha 0.5, T 2, top-k + tail labels:
    the fused top-k loss, the plain one (``fused=False``) and ``F.cross_entropy``; peak bytes in MB and the
    ratios to cross-entropy's (target for the fused loss: at most 1.1)."""
    p, v, k = LOSS_MEMORY["positions"], LOSS_MEMORY["vocab_size"], LOSS_MEMORY["k"]
    device = resolve_device(device_name)
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(p, v, generator=g) * 3
    labels = topk_labels(teacher, k, temperatures=(TEMPERATURE,))
    del teacher
    hidden, head = torch.randn(p, 64, generator=g).to(device), (torch.randn(64, v, generator=g) * 0.4).to(device)
    hard = torch.randint(0, v, (p,), generator=g).to(device)
    hard[::7] = IGNORE_INDEX
    labels = labels.to(device)
    fused, plain = (TopKDistillationLoss("kl", TEMPERATURE, ALPHA, fused=f) for f in (True, False))
    mb = {
        "ce": _loss_peak_bytes(lambda x: F.cross_entropy(x, hard, ignore_index=IGNORE_INDEX), hidden, head, device),
        "fused": _loss_peak_bytes(lambda x: fused(x, labels, hard)["loss"], hidden, head, device),
        "plain": _loss_peak_bytes(lambda x: plain(x, labels, hard)["loss"], hidden, head, device),
    }
    return {"positions": p, "vocab_size": v, "k": k, "device": str(device),
            **{f"{name}_peak_mb": round(b / 2**20, 1) for name, b in mb.items()},
            "fused_ce_ratio": round(mb["fused"] / mb["ce"], 3), "plain_ce_ratio": round(mb["plain"] / mb["ce"], 3)}


# --- memory: the real CLI in a subprocess, at two store sizes ---------------------------------

def _peak_rss_mb(store: str, data: str, out: str, device: str, shuffle_buffer: int | None) -> dict:
    """Peak RSS (MB) of `distill train-student` over one epoch: the training process's and its worker's."""
    m = MEMORY
    report = out + ".rss.json"
    buffer = ["--shuffle-buffer", str(shuffle_buffer)] if shuffle_buffer is not None else []
    buffer += ["--workers", str(WORKERS)] if WORKERS is not None else []
    main_mb, worker_mb = peak_rss_mb(
        ["train-student", "--labels", store, "--student", m["student"], "--data", data, "--out", out, "--epochs", "1",
         "--batch-size", str(m["batch_size"]), *buffer, "--temperature", str(TEMPERATURE), "--alpha", str(ALPHA),
         "--device", device, "--no-progress"], report)
    return {"main": main_mb, "worker": worker_mb, "total": main_mb + worker_mb}


def memory_stores(quick: bool, device: str, tmp: str, examples: int | None) -> dict:
    """The two stores of the memory check, 10 times apart, with their data and sizes."""
    m = MEMORY
    small = examples or m["examples"][quick]
    stores = {}
    for label, n in (("small", small), ("large", 10 * small)):
        data = write_data(f"memory-{label}", n, m, tmp)
        store = write_store(f"memory-{label}", m, data, tmp, m["examples_per_shard"], device)
        reader = open_store(store)
        first = reader.read_shard(0)
        decoded = sum(t.numel() * t.element_size() for t in (first.topk_ids, first.topk_logprobs, first.tail_logprob,
                                                              first.tempered_lse))  # bytes of labels, decoded
        stores[label] = {"data": data, "store": store, "examples": n, "positions": reader.num_positions,
                         "store_mb": round(reader.summary()["payload_bytes"] / 2**20, 2),
                         "decoded_store_mb": round(decoded / first.num_positions * reader.num_positions / 2**20, 1)}
    return stores


def run_memory(stores: dict, device: str, tmp: str, shuffle_buffer: int | None) -> dict:
    """train-student's peak RSS on both stores (``shuffle_buffer`` None: train-student's default)."""
    m = MEMORY
    rss = {label: _peak_rss_mb(s["store"], s["data"], os.path.join(tmp, f"memory-{label}-{shuffle_buffer}"), device,
                               shuffle_buffer) for label, s in stores.items()}
    s, g = stores["small"], stores["large"]
    default = StudentConfig.__dataclass_fields__["shuffle_buffer"].default
    return {
        "student": m["student"], "seq_len": m["seq_len"], "k": m["k"], "batch_size": m["batch_size"],
        "examples_per_shard": m["examples_per_shard"], "workers": loader_workers(WORKERS, resolve_device(device)),
        "epochs": 1,
        "shuffle_buffer": shuffle_buffer if shuffle_buffer is not None else default,
        "data": "parquet input_ids", "examples_small": s["examples"], "examples_large": g["examples"],
        "positions_small": s["positions"], "positions_large": g["positions"],
        "store_mb_small": s["store_mb"], "store_mb_large": g["store_mb"],
        "decoded_store_mb_small": s["decoded_store_mb"], "decoded_store_mb_large": g["decoded_store_mb"],
        **{f"{part}_rss_mb_{label}": round(rss[label][key], 1) for part, key in
           (("main", "main"), ("worker", "worker"), ("peak", "total")) for label in ("small", "large")},
        "peak_rss_ratio": round(rss["large"]["total"] / rss["small"]["total"], 4),
    }


def _say_memory(name: str, r: dict) -> None:
    size = r["shuffle_buffer"]
    buffer = "the default shuffle buffer" if size is None else f"shuffle buffer {size} examples"
    print(f"{name:>10}: train-student peak RSS {r['peak_rss_mb_small']:.0f} MB at {r['positions_small']:,} positions, "
          f"{r['peak_rss_mb_large']:.0f} MB at {r['positions_large']:,} (ratio {r['peak_rss_ratio']:.3f}; "
          f"{buffer})", file=sys.stderr)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds: under a minute on 2 CPU cores")
    parser.add_argument("--workload", choices=[*WORKLOADS, "all", "none"], default="all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=TRAINING_PRECISIONS,
                        help="the stages' --precision (auto: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating rounds (default 3, quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps before them")
    parser.add_argument("--examples", type=int, default=None, help="examples of the throughput workloads' data")
    parser.add_argument("--memory-examples", type=int, default=None,
                        help="examples of the small store of the memory check (the large one has 10 times more)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory check")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of every run (default: train-student's, 0 on a CPU, 1 on a GPU)")
    parser.add_argument("--no-default-buffer", action="store_true",
                        help="skip the memory check's second pair of runs, at train-student's default shuffle buffer "
                             "(always skipped with --quick)")
    args = parser.parse_args(argv)
    global WORKERS
    WORKERS = args.workers
    repeats = args.repeats or (2 if args.quick else 3)
    names = list(WORKLOADS) if args.workload == "all" else [] if args.workload == "none" else [args.workload]
    results, memory, memory_default = {}, None, None
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="distill-bench-train-") as tmp:
        for name in names:
            start = time.perf_counter()
            results[name] = r = run_workload(name, args.quick, args.device, repeats, tmp, args.steps, args.warmup,
                                             args.examples, args.precision)
            r["seconds"] = round(time.perf_counter() - start, 1)
            print(f"{name:>10}: steps/s CE {r['ce_steps_per_s']:.2f}, offline KD {r['offline_kd_steps_per_s']:.2f} "
                  f"(ratio {r['stream_overhead_ratio']:.3f}; the loss alone {r['loss_only_ratio']:.3f}), online KD "
                  f"{r['online_kd_steps_per_s']:.2f} (offline / online {r['offline_speedup']:.2f}, ideal "
                  f"{r['ideal_offline_speedup']:.2f})", file=sys.stderr)
        loss_memory = None
        if "lm" in names:  # the vocabulary-sized case: one loss step at V = 32,000 (a few seconds on a CPU)
            loss_memory = loss_peak_memory(args.device)
            print(f"      loss: peak memory of one step at V = {loss_memory['vocab_size']:,}: fused "
                  f"{loss_memory['fused_peak_mb']:.0f} MB, plain {loss_memory['plain_peak_mb']:.0f} MB, "
                  f"cross-entropy {loss_memory['ce_peak_mb']:.0f} MB (fused / CE {loss_memory['fused_ce_ratio']:.2f}, "
                  "target <= 1.1)", file=sys.stderr)
        if not args.no_memory:
            start = time.perf_counter()
            stores = memory_stores(args.quick, args.device, tmp, args.memory_examples)
            memory = run_memory(stores, args.device, tmp, MEMORY["shuffle_buffer"])
            memory["seconds"] = round(time.perf_counter() - start, 1)
            _say_memory("memory", memory)
            if not (args.quick or args.no_default_buffer):
                memory_default = run_memory(stores, args.device, tmp, None)
                _say_memory("memory", memory_default)
    out = {
        "benchmark": "train", "quick": args.quick, "target_stream_overhead_ratio": 0.90,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.machine(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__,
                    # other work on the machine skews every figure: 1-minute load averages before and after
                    "load_avg_before": round(load_before[0], 2), "load_avg_after": round(os.getloadavg()[0], 2)},
        "workloads": results,
        "memory": memory,
        "memory_default_buffer": memory_default,
        "loss_peak_memory": loss_memory,
        "meets_target": all(r["stream_overhead_ratio"] >= 0.90 for r in results.values()) if results else None,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
