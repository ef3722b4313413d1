"""`distill evaluate`: how good a model is, how close to its teacher, how big and how fast.

Reads top to bottom: load the model (and the teacher, or open the soft-label store), load
the data, refuse a store made for other data, run over the data once for the task metric
and the agreement with the teacher, then time the model: latency at batch 1 and
throughput at a large batch, each the fastest of interleaved timed calls after a warm-up.

What is reported, per model:

    metric, value   accuracy (classification) or perplexity = exp(mean next-token CE)
                    (causal LM) over the positions that have a target, with positions and
                    next-token targets exactly as stage two aligns them
    params          parameters of the module (tied weights once); a model written by
                    `distill quantize` reports its source's count, which quantization keeps
    bytes           size on disk of the saved weights: the run directory's weights file
                    (model.safetensors, or model.pt for a quantized model), a Hugging Face
                    directory's weight files, a TorchScript file or a --weights file; a
                    built-in or factory with no file: what its float32 state dict would take
                    (``bytes_source`` says which)
    latency_ms      one forward pass at batch 1 (the first example)
    throughput      examples/s (classification) or tokens/s (causal LM) at a batch of
                    ``throughput_batch`` examples
    timing_threads  the intra-op threads both were timed on (``--timing-threads``: 1 by
                    default, a model serving one request per core; the CPU only)

Speed is measured once per model, the model and its teacher (and, through ``evaluate_models``,
every model of a comparison) timed together in rounds after ``warmup`` untimed passes: each
of ``repeats`` rounds times a burst of passes of each (calls back to back for ``burst_s``),
and the figure is the fastest pass (other processes only ever slow a pass down; see
``distill.pipeline.timing``), with more rounds until they have taken ``min_timing_s``. The table, the
retention line and ``distill report`` all show these figures.

Agreement with the teacher (at every position, as the store holds them): with ``teacher``
the teacher runs over the same batches: top-1 agreement and the mean full-vocabulary
KL(teacher || model) at T=1; with ``labels`` the store's top-1 id (the largest stored
log-prob; for a sampled store, the likeliest drawn id) and the mean KL over the store's
K+1 buckets, KL(teacher buckets || model buckets), at T=1.

Given a teacher, the retention line compares the two: ``retention`` is model/teacher for
accuracy and teacher/model for perplexity (lower is better: the line says the student's
perplexity as a multiple of the teacher's, 1 / retention); ``size_ratio`` is
bytes/teacher_bytes and ``speedup`` teacher latency / model latency at batch 1.

A model that is a run (or quantize) directory with a model card distill wrote
(``model/README.md``) gets this report's table and retention line in the card's results
section, replaced at each evaluation (``distill.pipeline.modelcard``).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

from distill.errors import ConfigError, StoreError
from distill.pipeline.allocator import tune_allocator
from distill.pipeline.data import DataFlags, ExampleSet, choose_split, load_data
from distill.pipeline.formatting import human_bytes
from distill.pipeline.labelstore import check_store_matches, open_complete_store
from distill.pipeline.losses import bucket_divergence, student_buckets
from distill.pipeline.modelcard import record_results
from distill.pipeline.modelfiles import model_bytes, pinned_device
from distill.pipeline.models import LoadedModel, ModelConfig, ModelFlags, load_model
from distill.pipeline.config import check_settings, setting
from distill.pipeline.context import check_fits_context, resolve_seq_len, stored_seq_len
from distill.pipeline.runtime import DeviceFlags, autocast, resolve_device, to_device
from distill.pipeline.scoring import Score
from distill.pipeline.tasks import Positions
from distill.pipeline.timing import speedup_text, time_together
from distill.pipeline.tokenize import tokenizer_beside
from distill.pipeline.tokenfiles import looked_for_tokenizer

__all__ = ["EvaluateConfig", "evaluate_model", "evaluate_models", "format_report", "retention_line", "card_results"]


@dataclasses.dataclass(frozen=True)
class EvaluateConfig(DataFlags, ModelFlags, DeviceFlags):
    """Settings of `distill evaluate` (each field's help is its flag's).

    ``weights`` and ``task`` apply to ``model``; ``trust_remote_code`` to ``model`` and ``teacher``.
    With ``device`` auto, a dynamic-int8 model runs on the CPU, where its kernels are.
    """

    model: str | None = setting(None, "The model to evaluate: a run directory, Hugging Face directory, TorchScript "
                                      "file, built-in or package.module:factory.")
    data: str | None = setting(None, "Data spec, as for generate-labels.")
    teacher: str | None = setting(None, "A teacher model spec: agreement with it, its own figures and the retention line.")
    labels: str | None = setting(None, "A soft-label store of this data (instead of --teacher): agreement with the "
                                       "stored teacher.")
    batch_size: int = setting(64, "Examples per batch for the metric and agreement.", minimum=1)
    throughput_batch: int | None = setting(None, "Examples per batch for throughput.", minimum=1,
                                           default_help="256, or 16 sequences for causal LMs")
    warmup: int = setting(10, "Untimed passes before timing (TorchScript re-optimises over its first calls).",
                          minimum=0)
    repeats: int = setting(30, "Timed rounds, one pass of each model a round; latency and throughput are the "
                               "fastest pass's.", minimum=1)
    min_timing_s: float = setting(3.0, "Time rounds for at least this long (seconds; more rounds than --repeats "
                                       "if need be): on a busy machine the fastest pass needs time to happen.",
                                  minimum=0)
    burst_s: float = setting(0.005, "In each round, call each pass back to back until this long (seconds) has "
                                    "passed: a small model's batch-1 latency is its warm call's, not the first call "
                                    "after another model's large batch.", minimum=0)
    timing_threads: int = setting(1, "Intra-op threads while timing on the CPU (0: torch's default, all cores). One "
                                     "thread: each model as one request on one core, the rounds taking turns on "
                                     "each core and the least disturbed core's figure counting, which two runs "
                                     "agree on; several threads wait on the slowest core.", minimum=0)
    split: str = setting("test", "Data split to evaluate.", kw_only=True)

    def __post_init__(self):
        check_settings(self)
        if not self.model or not self.data:
            raise ConfigError("missing --model or --data: evaluate needs both")
        if self.teacher and self.labels:
            raise ConfigError("pass --teacher or --labels, not both: agreement is measured against one of them")


def evaluate_model(config: EvaluateConfig) -> dict:
    """Evaluate ``config.model`` on the data; returns the report as a JSON-able dict (see the module docstring).

    Keys: model, task, device, metric, value, positions, params, bytes, bytes_source, latency_ms,
    throughput, throughput_unit; with a teacher or a store also agreement, kl, agreement_with;
    with a teacher also teacher (the same figures for it), teacher_value, retention, size_ratio, speedup.
    """
    return evaluate_models([config])[0]


def evaluate_models(configs: list[EvaluateConfig]) -> list[dict]:
    """Several evaluations whose speed figures are measured once per model: configs -> their reports, in order.

    Every distinct model among the configs' models and teachers (by spec and device) is timed
    once, all of them in the same interleaved rounds (``distill.pipeline.timing``), with the
    first config's warmup, repeats, min_timing_s and throughput_batch, on the data of the first
    config that names it; each report's own figures, its teacher's and its speedup are those.
    """
    if not configs:
        return []
    timed: dict[tuple[str, str], tuple] = {}  # (spec, device) -> (model, data, device, precision)
    measured = []
    for config in configs:
        report, models = _measure(config)
        for key, job in models.values():
            timed.setdefault(key, job)
        measured.append((report, {role: key for role, (key, _) in models.items()}))
    with torch.inference_mode():
        speeds = dict(zip(timed, _speeds(list(timed.values()), configs[0])))
    for report, keys in measured:
        report.update(speeds[keys["model"]])
        if "teacher" in keys:
            report["teacher"].update(speeds[keys["teacher"]])
            report.update(_compare(report, report["teacher"]))
    for config, (report, _) in zip(configs, measured):
        record_results(config.model, card_results(report, config.data))  # a run directory's card, when it has one
    return [report for report, _ in measured]


def card_results(report: dict, data: str) -> str:
    """The results section of a model card (Markdown): the report's table and its retention line."""
    against = f", against the teacher `{report['teacher']['model']}`" if "teacher" in report else ""
    kept = retention_line(report) if report.get("retention") is not None else None
    table = "\n".join(line for line in format_report(report).splitlines() if line != kept)  # kept below, as prose
    return (f"`distill evaluate` on `{data}` (split {report['split']}, {report['device']}){against}:\n\n"
            f"```text\n{table}\n```" + (f"\n\n{kept}" if kept else ""))


def _measure(config: EvaluateConfig) -> tuple[dict, dict]:
    """The report of ``config`` without its speed figures, and {"model" (and "teacher"): (key, timing job)}."""
    config = dataclasses.replace(config, split=choose_split(config.data, config.split))  # a lone file: its one split
    device = _device(config)
    model = load_model(ModelConfig(config.model, weights=config.weights, task=config.task,
                                   trust_remote_code=config.trust_remote_code), device=device)
    teacher = None if not config.teacher else load_model(
        ModelConfig(config.teacher, trust_remote_code=config.trust_remote_code), device=device)
    tokenizer = config.tokenizer or tokenizer_beside(config.model) or tokenizer_beside(config.teacher)
    stored = open_complete_store(config.labels).spec.extra if config.labels else None  # the data cut as it was
    seq_len = (stored_seq_len(config.seq_len, stored, config.labels, model, "model") if stored is not None
               else resolve_seq_len(config.seq_len, model=model, teacher=teacher))
    with looked_for_tokenizer(model=config.model, teacher=config.teacher):
        data = load_data(config.data_config(config.data, task=model.task, tokenizer=tokenizer, seq_len=seq_len))
    check_fits_context(data, f"data {config.data!r}", model=model, teacher=teacher)
    if len(data) == 0:
        raise ConfigError(f"data {config.data!r} (split {config.split!r}) has no examples: check the spec and --split")
    store = _open_labels(config, model, data) if config.labels else None
    if teacher is not None:
        _check_teacher(config, model, teacher)

    precision = lambda: autocast(config.precision, device)  # noqa: E731
    with torch.inference_mode():
        quality = _quality(model, teacher, store, data, config.batch_size, device, precision)
        report = {"model": config.model, "task": model.task, "device": str(device), "split": config.split,
                  **quality["model"], **_footprint(model)}
        if "agreement" in quality:
            report.update(agreement=quality["agreement"], kl=quality["kl"],
                          agreement_with="teacher" if teacher is not None else "labels")
        if teacher is not None:
            report.update(teacher={"model": config.teacher, **quality["teacher"], **_footprint(teacher)},
                          teacher_value=quality["teacher"]["value"])
    models = {"model": ((_key(config.model), str(device)), (model, data, device, precision))}
    if teacher is not None:
        models["teacher"] = ((_key(config.teacher), str(device)), (teacher, data, device, precision))
    return report, models


def _key(spec: str) -> str:
    """A model spec as one name: a path spelled two ways is one model."""
    return os.path.normpath(os.path.abspath(spec)) if os.path.exists(spec) else spec


# --- setup ------------------------------------------------------------------------------------

def _device(config: EvaluateConfig) -> torch.device:
    """--device; for a quantized model (or teacher) that runs on one device only, that device, and auto follows it."""
    pins = {spec: pin for spec in (config.model, config.teacher) if spec and (pin := pinned_device(spec))}
    if len({pin.device for pin in pins.values()}) > 1:
        (a, pin_a), (b, pin_b) = pins.items()
        raise ConfigError(f"{a} runs on {pin_a.device} only and {b} on {pin_b.device} only: evaluate them apart, "
                          f"or re-quantize one with --device {pin_a.device}")
    if not pins:
        return resolve_device(config.device)
    spec, pin = next(iter(pins.items()))
    pinned = torch.device(pin.device)
    if pinned.type == "cuda" and not (torch.cuda.is_available() and pinned.index < torch.cuda.device_count()):
        raise ConfigError(f"{spec} runs on {pin.device} only ({pin.why}), and this machine has no {pin.device}: "
                          f"{pin.fix}")
    try:
        asked = pinned if config.device == "auto" else torch.device(config.device)
    except RuntimeError:
        return resolve_device(config.device)  # says what names there are
    if asked.type != pinned.type or (asked.type == "cuda" and asked.index not in (None, pinned.index)):
        raise ConfigError(f"{spec} runs on {pin.device} only ({pin.why}), not on --device {config.device}: "
                          f"pass --device {pin.device} (or auto), or {pin.fix}")
    return resolve_device(pin.device)


def _check_teacher(config: EvaluateConfig, model: LoadedModel, teacher: LoadedModel) -> None:
    if teacher.task != model.task:
        raise ConfigError(f"the teacher {config.teacher!r} does {teacher.task} but the model {config.model!r} "
                          f"does {model.task}: compare models of one task")
    if model.task == "causal-lm" and model.output_size > teacher.output_size:
        model.use_vocabulary(teacher.output_size)  # a padded vocabulary: compared over the teacher's ids
    elif teacher.output_size != model.output_size:
        raise ConfigError(f"the teacher outputs {teacher.output_size} values but the model {model.output_size}: "
                          "agreement needs one vocabulary (or set of classes)")


def _open_labels(config: EvaluateConfig, model: LoadedModel, data: ExampleSet):
    store = open_complete_store(config.labels)
    check_store_matches(store, config.labels, data, model.output_size, "model")
    if model.output_size > store.spec.vocab_size:  # a padded vocabulary: scored over the teacher's ids
        model.use_vocabulary(store.spec.vocab_size)
    return store


# --- one pass over the data: the metric, and agreement with the teacher ------------------------

def _quality(model: LoadedModel, teacher: LoadedModel | None, store, data: ExampleSet, batch_size: int,
             device: torch.device, precision, chunk_elements: int | None = None) -> dict:
    """The metric of the model (and the teacher) and the agreement, in one pass over the data.

    Beside the models' own logits it holds about ``chunk_elements`` (positions x vocabulary)
    values at a time (None: LOGITS_CHUNK_ELEMENTS): positions are taken out of the raw
    logits and scored chunk by chunk, never copied whole.
    """
    mine, theirs = Score(), Score()
    agreement, positions = torch.zeros(2, dtype=torch.float64, device=device), 0  # top-1 matches, summed KL
    for batch, labels in _batches(data, store, batch_size):
        batch = to_device(batch, device)
        with precision():
            logits = model.logits(batch)  # (B, C) or (B, L, V)
            teacher_logits = None if teacher is None else teacher.logits(batch)
        kept = Positions.of(batch, model.task, logits.device)
        if labels is not None and labels.num_positions != len(kept):
            raise StoreError(f"a batch has {len(kept)} positions in the data but {labels.num_positions} in "
                             "the store: regenerate the store from this data")
        for span in kept.spans(logits.shape[-1], chunk_elements):
            found = _chunk_quality(kept, span, logits, teacher_logits, labels, mine, theirs)
            if found is not None:
                agreement += found.to(agreement.device)
                positions += span.stop - span.start
    out = {"model": mine.result(model.task)}
    if teacher is not None:
        out["teacher"] = theirs.result(model.task)
    if teacher is not None or store is not None:
        agree, kl_sum = agreement.tolist()
        out["agreement"] = agree / positions if positions else None
        out["kl"] = kl_sum / positions if positions else None
    return out


def _chunk_quality(kept: Positions, span: slice, logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                   labels, mine: Score, theirs: Score) -> torch.Tensor | None:
    """Score positions ``span`` of a batch; their (top-1 matches, summed KL) with the teacher or store, if any.

    A function of its own so that a chunk's rows are freed before the next chunk's are gathered.
    """
    rows = kept.rows(logits, span)  # (p, V)
    mine.add(rows, kept.hard[span])
    if teacher_logits is not None:
        teacher_rows = kept.rows(teacher_logits, span)  # (p, V)
        theirs.add(teacher_rows, kept.hard[span])
        return _agreement_with_logits(teacher_rows, rows)
    if labels is not None:
        return _agreement_with_labels(labels, span, rows)
    return None


def _batches(data: ExampleSet, store, batch_size: int):
    """(batch, labels of its examples or None): consecutive examples; with a store, its batches (never across shards)."""
    if store is None:
        for a in range(0, len(data), batch_size):
            yield data.gather(torch.arange(a, min(a + batch_size, len(data)))), None
        return
    for labels in store.iter_batches(batch_size):
        a = labels.example_start
        yield data.gather(torch.arange(a, a + labels.num_examples)), labels


def _agreement_with_logits(teacher_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """(top-1 matches, summed full-vocabulary KL(teacher || model)) over (p, V) logits at T=1, float64 (2,)."""
    matches = (teacher_logits.argmax(-1) == logits.argmax(-1)).sum()
    p_log = F.log_softmax(teacher_logits, -1, dtype=torch.float32)  # (p, V)
    terms = F.log_softmax(logits, -1, dtype=torch.float32).neg_().add_(p_log)  # log p - log q, (p, V)
    kl = terms.mul_(p_log.exp_()).sum()  # in place: two (p, V) float32 buffers, not five
    return torch.stack([matches.double(), kl.double()])


def _agreement_with_labels(labels, span: slice, logits: torch.Tensor) -> torch.Tensor:
    """(top-1 matches with the store's top-1 id, summed KL over its K+1 buckets) at T=1, float64 (2,).

    ``logits`` (p, V) are those of the store's positions ``span`` of ``labels``.
    """
    ids = labels.topk_ids[span].to(logits.device)  # (p, K)
    teacher_lp = labels.topk_logprobs[span].to(logits.device)  # (p, K), -inf on a sampled store's padding slots
    top1 = ids.gather(1, teacher_lp.argmax(1, keepdim=True))[:, 0]  # (p,)
    kept = None if labels.counts is None else labels.counts[span].to(logits.device) > 0
    student_lp, student_tail = student_buckets(logits, ids, 1.0, kept)
    kl = bucket_divergence("kl", teacher_lp, labels.tail_logprob[span].to(logits.device), student_lp, student_tail)
    return torch.stack([(logits.argmax(-1) == top1).sum().double(), kl.sum().double()])


# --- size and speed -------------------------------------------------------------------------------

def _footprint(model: LoadedModel) -> dict:
    count = getattr(model.module, "num_parameters", None)  # set by `distill quantize`: packed weights are no parameters
    if not isinstance(count, int) or isinstance(count, bool):
        count = sum(p.numel() for p in model.module.parameters())
    size, source = model_bytes(model)
    return {"params": int(count), "bytes": size, "bytes_source": source}


def _speeds(jobs: list[tuple], config: EvaluateConfig) -> list[dict]:
    """Latency at batch 1 and throughput at a large batch of each (model, data, device, precision) job, all timed
    together: {latency_ms, throughput, throughput_unit, throughput_batch} per job, in order."""
    passes, figures = [], []
    for model, data, device, precision in jobs:
        causal = model.task == "causal-lm"
        n = config.throughput_batch or (16 if causal else 256)
        one = to_device(data.collate([data[0]]), device)
        many = to_device(data.collate([data[i % len(data)] for i in range(n)]), device)
        passes += [_forward(model, one, device, precision), _forward(model, many, device, precision)]
        figures.append((int(many["attention_mask"].sum()) if causal else n, n, causal))
    tune_allocator()  # a pass's buffers reused, not faulted in again at every call (distill.pipeline.allocator)
    default_threads = torch.get_num_threads()
    threads = config.timing_threads or default_threads
    torch.set_num_threads(threads)
    try:
        # one thread on the CPU: rounds take turns on each core, and the least disturbed core's figure counts
        rotate = threads == 1 and hasattr(os, "sched_getaffinity") and all(job[2].type == "cpu" for job in jobs)
        seconds = time_together(passes, config.warmup, config.repeats, config.min_timing_s, config.burst_s,
                                sorted(os.sched_getaffinity(0)) if rotate else None)
    finally:
        torch.set_num_threads(default_threads)
    return [{"latency_ms": seconds[2 * i] * 1e3, "throughput": work / seconds[2 * i + 1],
             "throughput_unit": "tokens/s" if causal else "examples/s", "throughput_batch": n,
             "timing_threads": threads}
            for i, (work, n, causal) in enumerate(figures)]


def _forward(model: LoadedModel, batch: dict, device: torch.device, precision):
    """A callable that runs one forward pass over ``batch`` and returns once it is done."""
    def run():
        with precision():
            model.logits(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return run


def _compare(mine: dict, theirs: dict) -> dict:
    """retention (model/teacher for accuracy, teacher/model for perplexity), size_ratio, speedup."""
    retention = None
    if mine["value"] is not None and theirs["value"]:
        retention = (theirs["value"] / mine["value"] if mine["metric"] == "perplexity"
                     else mine["value"] / theirs["value"])
    return {"retention": retention,
            "size_ratio": mine["bytes"] / theirs["bytes"] if theirs["bytes"] else None,
            "speedup": theirs["latency_ms"] / mine["latency_ms"] if mine["latency_ms"] > 0 else None}


# --- the human-readable report ----------------------------------------------------------------------

def format_report(report: dict) -> str:
    """An aligned table (teacher first, when given), then the retention and agreement lines."""
    threads = report.get("timing_threads")
    on_cpu = report.get("device", "cpu") == "cpu"
    timed = f" ({threads} thread{'s' if threads != 1 else ''})" if threads and on_cpu else ""
    rows = [("model", report["metric"], "params", "size", "latency" + timed, "throughput" + timed)]
    if "teacher" in report:
        rows.append(_row("teacher", report["teacher"]))
    rows.append(_row("student" if "teacher" in report else "model", report))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    if report.get("retention") is not None:
        lines.append(retention_line(report))
    if report.get("ece") is not None:
        theirs = report.get("teacher", {}).get("ece")
        lines.append(f"expected calibration error of the top-1 ({Score.ECE_BINS} bins): {report['ece']:.4f}"
                     + (f" (teacher {theirs:.4f})" if theirs is not None else ""))
    if report.get("agreement") is not None:
        lines.append(f"agreement with the {report['agreement_with']}: top-1 {report['agreement']:.1%}, "
                     f"mean KL(teacher || model) {report['kl']:.4f} nats")
    return "\n".join(lines)


def retention_line(report: dict, name: str = "student") -> str:
    """``student keeps X% of the teacher's accuracy, is Y% smaller and Z× faster``; for perplexity (lower is
    better) ``student has perplexity R× the teacher's, ...``; larger / slower when so."""
    ratio, speedup = report["size_ratio"], report["speedup"]
    size = "of unknown size" if ratio is None else f"{1 - ratio:.1%} smaller" if ratio <= 1 else f"{ratio - 1:.1%} larger"
    speed = speedup_text(speedup)
    if report["metric"] == "perplexity":  # retention is teacher / student here: say the student's multiple
        quality = (f"has perplexity {1 / report['retention']:.2f}× the teacher's" if report["retention"]
                   else "has an infinite perplexity")
    else:
        quality = f"keeps {report['retention']:.1%} of the teacher's {report['metric']}"
    return f"{name} {quality}, is {size} and {speed}"


def _row(name: str, r: dict) -> tuple[str, ...]:
    value = "-" if r["value"] is None else f"{r['value']:.4f}"
    unit = "tok/s" if r["throughput_unit"] == "tokens/s" else "ex/s"
    return (f"{name} {r['model']}", value, f"{r['params']:,}", human_bytes(r["bytes"], decimals=1),
            f"{r['latency_ms']:.3f} ms", f"{r['throughput']:,.0f} {unit}")
