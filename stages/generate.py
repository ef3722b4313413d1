"""Stage one, `distill generate-labels`: run the teacher once and store its soft labels.

Reads top to bottom: load the teacher and the data, describe the store (its spec, with
both fingerprints), take this worker's pending shards, run the teacher batch by batch
while a writer thread encodes and writes finished shards, then seal the store.

Work is split by shard: shard i belongs to worker ``i % world`` (torchrun rank or
``--shard I/N`` task), so workers never touch one shard's files. A shard is written only
once all its examples are labelled, and marked complete by its commit record last, so a
crash at any moment loses at most the shards in flight; rerunning the same command redoes
exactly those. A process writes a shard only while it holds the shard's lock, so two
processes started on one local store by mistake split the shards (each waits for the
shards the other holds, then both seal the store). Sampling draws from a generator seeded by (seed, shard), so a shard's
labels do not depend on which worker made them or how often it was redone.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import sys
import threading
import time

import torch

from distill import __version__
from distill.errors import ConfigError
from distill.pipeline.allocator import release_free_memory
from distill.pipeline.data import DataFlags, ExampleSet, load_data
from distill.pipeline.formatting import data_summary
from distill.pipeline.models import (LoadedModel, ModelConfig, ModelFlags, float32_output_layer, load_model,
                                     packed_attention)
from distill.pipeline.progress import Progress
from distill.pipeline.provenance import (check_teacher_license, dataset_identity, provenance,
                                         teacher_identity)
from distill.pipeline.config import check_settings, config_to_dict, setting
from distill.pipeline.context import DEFAULT_SEQ_LEN, check_fits_context, resolve_seq_len
from distill.pipeline.runtime import (PRECISION_ALIASES, PRECISIONS, DeviceFlags, Workers, autocast, compute_dtype,
                                      parse_shard, pin, resolve_device, to_device, weight_dtype, workers)
from distill.pipeline import tasks
from distill.pipeline.tasks import Positions
from distill.pipeline.tokenize import tokenizer_beside
from distill.pipeline.tokenfiles import looked_for_tokenizer
from distill.storage import (BACKENDS, METHODS, SAMPLINGS, VALUE_ENCODINGS, SoftLabels, StoreSpec, StoreWriter,
                             compiled_topk_applies, concat_labels, create_store, empty_labels, open_store,
                             open_store_writer, sampled_labels, topk_labels)
from distill.storage.codecs import ID_CODINGS, VALUE_BITS, ValueEncoding

__all__ = ["GenerateConfig", "generate_labels", "DEFAULTS", "store_spec", "batch_labels"]


@dataclasses.dataclass(frozen=True)
class LabelDefaults:
    """What generate-labels stores by default for a task (what wins the quality benchmark, docs/RESULTS.md)."""

    k: int
    tail_samples: int


# top-k ids per position (capped at the output size) and tail draws: see docs/RESULTS.md for the measurements
DEFAULTS = {"classification": LabelDefaults(k=64, tail_samples=0), "causal-lm": LabelDefaults(k=4, tail_samples=48)}
TARGET_SHARD_POSITIONS = 65536  # default shard size: about this many positions, a few MB encoded
# Logits reduced at once by torch's reduction on a CPU (elsewhere LOGITS_CHUNK_ELEMENTS). Its passes
# over (positions x vocabulary) are bound by memory bandwidth: a chunk about the size of a last-level cache
# (32 MiB of float32) is mostly read from DRAM once instead of once per pass. Measured on 2 cores at
# V = 32,000: 15% less time for k = 4 with 48 tail draws (the causal-LM default), the same for k = 64.
# The compiled reduction (distill.storage.native) reads each row from cache anyway and splits a chunk's rows
# over threads: it takes a whole LOGITS_CHUNK_ELEMENTS (benchmarks/generate.py --workload lm-small, two
# alternated pairs: overhead_ratio 0.797 and 0.846 against 0.718 and 0.756 at CPU_REDUCE_ELEMENTS).
CPU_REDUCE_ELEMENTS = 1 << 23


def _reduce_elements(device: torch.device, spec: StoreSpec, config: GenerateConfig) -> int:
    """Logits reduced at once on ``device``: LOGITS_CHUNK_ELEMENTS, at most CPU_REDUCE_ELEMENTS on a CPU
    where torch's reduction runs (not the compiled one)."""
    compiled = spec.method == "topk" and compiled_topk_applies(spec.vocab_size, spec.k, spec.tail_samples,
                                                               spec.sample_temperature or 1.0, config.sampling)
    if device.type == "cpu" and not compiled:
        return min(CPU_REDUCE_ELEMENTS, tasks.LOGITS_CHUNK_ELEMENTS)
    return tasks.LOGITS_CHUNK_ELEMENTS


def _default_help(name: str) -> str:
    values = {task: getattr(d, name) for task, d in DEFAULTS.items()}
    capped = ", at most the output size" if name == "k" else ""
    return " for causal LMs, ".join((str(values["causal-lm"]), f"{values['classification']} for classifiers{capped}"))


@dataclasses.dataclass(frozen=True)
class GenerateConfig(DataFlags, ModelFlags, DeviceFlags):
    """Settings of one label-generation job: the flags of `distill generate-labels` (each field's help is its flag's).

    With ``precision`` bf16 or fp16 the teacher's weights are cast too; ``dtype`` is the old
    name of ``precision`` (float32, bfloat16, float16 are fp32, bf16, fp16).
    """

    teacher: str | None = setting(None, "Teacher: a Hugging Face directory, package.module:factory, a TorchScript "
                                        "file, or a built-in (mlp, cnn, gpt).")
    data: str | None = setting(None, "Data: mnist1d, a .parquet/.jsonl/.txt file or directory, a saved `datasets` "
                                     "dataset, or package.module:function.")
    out: str = setting("", "The store to write: a directory path or fsspec URL.")
    method: str = setting("topk", "Top-k ids with exact log-probs and tail, or sampled ids.", choices=METHODS)
    k: int | None = setting(None, "Top-k size.", minimum=1, default_help=_default_help("k"))
    tail_samples: int | None = setting(None, "Ids drawn per position from the teacher's distribution outside the "
                                             "top k (method topk): exact in the head, unbiased in the tail.",
                                       minimum=0, default_help=_default_help("tail_samples"))
    samples: int = setting(12, "Draws per position for --method sample.", minimum=1)
    sampling: str = setting("systematic", "How draws are made: systematic (each id drawn within one of its expected "
                                          "count) or iid (independent, multinomial).", choices=SAMPLINGS)
    temperatures: tuple[float, ...] = setting((1.0, 2.0), "Store the exact normaliser for this temperature; repeat "
                                                          "for several.", flag="--temperature")
    sample_temperature: float = setting(1.0, "Temperature of the distribution draws come from.")
    batch_size: int = setting(32, "Examples per teacher forward pass.", minimum=1)
    backend: str = setting("zarr", "Store backend.", choices=BACKENDS)
    value_encoding: str = setting("sqrt", "How log-probs are stored: sqrt (1 byte, error measured in "
                                          "docs/FORMAT.md) or lossless.", choices=VALUE_ENCODINGS)
    value_bits: int | None = setting(None, "Precision of --value-encoding sqrt: 2^N - 1 levels, N from 2 to 16 "
                                           "(fewer bytes, more KL: see benchmarks/store.py).", minimum=VALUE_BITS[0],
                                     default_help="8 (255 levels, 1 byte)")
    id_coding: str = setting("delta", "How ids are stored: delta (gaps between ascending ids) or rank (gaps between "
                                      "ranks in a per-shard frequency table: fewer bytes for large k, see "
                                      "docs/FORMAT.md).", choices=ID_CODINGS)
    examples_per_shard: int | None = setting(None, "Shard size.", minimum=1, default_help="about 65,536 positions")
    shard: str | None = setting(None, "I/N: do only this job-array task's shards; seal with --finalize afterwards.")
    finalize: bool = setting(False, "Only check that every shard is complete and seal the store.")
    overwrite: bool = setting(False, "Replace a store made with other settings.")
    repair: bool = setting(False, "First check every complete shard's checksums and redo the damaged ones.")
    seed: int = setting(0, "Seed of the draws for --method sample.")
    queue_size: int = setting(8, "Labelled batches that may wait for the writer thread.", minimum=1)
    progress: bool = setting(True, "No progress bar or log lines.")
    accept_teacher_license: str | None = setting(None, "Acknowledge the teacher's licence NAME (e.g. llama3), whose "
                                                       "terms restrict training on its outputs: recorded in the store "
                                                       "(not legal advice; see README).")
    require_known_license: bool = setting(False, "Refuse a teacher that declares no licence (config.json or "
                                                 "README.md metadata) unless --accept-teacher-license unknown.")
    precision: str = setting("auto", "auto: bf16 autocast on CUDA, fp32 on the CPU; bf16 and fp16 cast the "
                                     "teacher's weights too.", choices=PRECISIONS, value_aliases=PRECISION_ALIASES,
                             aliases=("--dtype",), kw_only=True)
    dtype: dataclasses.InitVar[str | None] = None

    def __post_init__(self, dtype: str | None = None):
        if dtype is not None:
            object.__setattr__(self, "precision", dtype)
        check_settings(self)
        if not self.out:
            raise ConfigError("missing --out: pass the path of the store to write")
        if not self.finalize and (not self.teacher or not self.data):
            raise ConfigError("missing --teacher or --data: generate-labels needs both (or --finalize to seal a store)")
        temps = tuple(float(t) for t in self.temperatures)
        if any(not (t > 0 and math.isfinite(t)) for t in (*temps, self.sample_temperature)):
            raise ConfigError(f"temperatures must be finite and > 0, got {list(temps)}: e.g. --temperature 2")
        object.__setattr__(self, "temperatures", temps)
        parse_shard(self.shard)
        if self.method == "sample" and self.tail_samples:
            raise ConfigError("--tail-samples draws from the tail of a top-k store: use --method topk, or --samples "
                              "for --method sample")
        if self.shard is not None and self.overwrite:
            raise ConfigError("--overwrite with --shard would let array tasks delete each other's shards: "
                              "remove the old store once, before the array starts")
        if self.value_bits is not None and self.value_encoding == "lossless":
            raise ConfigError("--value-bits sets the precision of --value-encoding sqrt, but lossless stores float32: "
                              "drop --value-bits or use --value-encoding sqrt")
        if self.value_bits is not None and self.value_bits > VALUE_BITS[1]:
            raise ConfigError(f"--value-bits must be at most {VALUE_BITS[1]}, got {self.value_bits}: "
                              "use --value-encoding lossless for exact values")

    @property
    def stored_value_encoding(self) -> ValueEncoding:
        """The store's value encoding: --value-encoding, with --value-bits' levels when given."""
        if self.value_bits is None:
            return ValueEncoding.named(self.value_encoding)
        return ValueEncoding.from_bits(self.value_bits)


def generate_labels(config: GenerateConfig) -> dict:
    """Run the teacher over the data and write (or resume) the store at ``config.out``.

    Returns a summary: this worker's shards, examples, positions, seconds, and, when
    this worker sealed the store, the store's own summary.
    """
    if config.finalize:
        return _finalize_only(config)
    device = resolve_device(config.device)
    team = workers(parse_shard(config.shard), device)
    try:
        return _generate(config, device, team)
    finally:
        team.close()


def _generate(config: GenerateConfig, device: torch.device, team: Workers) -> dict:
    say = _Say(team.rank == 0 or not team.distributed, config.progress)  # progress=False: silent unless told to act
    identity = teacher_identity(config.teacher)  # from the teacher's files: refused before anything loads or is written
    check_teacher_license(identity, config.accept_teacher_license, config.require_known_license)
    teacher = load_model(ModelConfig(config.teacher, weights=config.weights, task=config.task,
                                     trust_remote_code=config.trust_remote_code),
                         device=device, dtype=weight_dtype(config.precision, device))
    exact_head = float32_output_layer(teacher)  # the logits the exact log-probs come from: never bf16
    config = dataclasses.replace(config, seq_len=resolve_seq_len(config.seq_len, teacher=teacher))
    tokenizer = config.tokenizer if config.tokenizer is not None else tokenizer_beside(config.teacher)
    with looked_for_tokenizer(teacher=config.teacher):
        data = load_data(config.data_config(config.data, task=teacher.task, tokenizer=tokenizer))
    _check_compatible(config, teacher, data)
    check_fits_context(data, f"data {config.data!r}", teacher=teacher)
    spec = store_spec(config, teacher, data, device, exact_head)
    spec = dataclasses.replace(spec, extra={**spec.extra, "provenance": _provenance(config, teacher, data, spec, identity)})
    writer = _open_store(config, spec, team, say)
    pending = writer.pending_shards()
    mine = [i for i in pending if i % team.world == team.rank]
    say(f"generate-labels: {len(data):,} examples in {spec.num_shards:,} shard(s), {len(pending):,} to do"
        + (f", {len(mine):,} for worker {team.rank} of {team.world}" if team.world > 1 else "")
        + f"; teacher {teacher.fingerprint[:19]} on {device}"
        + (f"; data: {data_summary(spec.extra['data'])}" if "data" in spec.extra else ""))

    start = time.perf_counter()
    counts = _label_shards(config, teacher, data, writer, mine, device, team, say)
    seconds = time.perf_counter() - start
    result = {**counts, "seconds": seconds,
              "positions_per_s": counts["positions"] / seconds if seconds > 0 else 0.0}

    team.barrier()  # every rank's shards are committed
    if team.world == 1 or (team.distributed and team.rank == 0):
        writer.finalize()
        result["store"] = open_store(config.out).summary()
        say(f"generate-labels: store {config.out} complete")
    elif not team.distributed:
        say.note(f"generate-labels: task {team.rank} of {team.world} done; once all tasks are, seal the store with "
                 f"`distill generate-labels --out {config.out} --finalize`")
    return result


def _provenance(config: GenerateConfig, teacher: LoadedModel, data: ExampleSet, spec: StoreSpec, identity: dict) -> dict:
    """``extra["provenance"]`` (docs/FORMAT.md): who made the store, from what, with which settings."""
    identity = {**identity, "weights_fingerprint": teacher.fingerprint,
                "parameters": identity["parameters"] or sum(p.numel() for p in teacher.module.parameters())}
    dataset = dataset_identity(config.data, config.split, len(data), spec.dataset_fingerprint)
    return provenance(identity, dataset, config_to_dict(config), __version__, config.accept_teacher_license)


def _finalize_only(config: GenerateConfig) -> dict:
    writer = open_store_writer(config.out)
    writer.finalize()
    return {"store": open_store(config.out).summary()}


# --- setup -------------------------------------------------------------------------------

def _check_compatible(config: GenerateConfig, teacher: LoadedModel, data: ExampleSet) -> None:
    if len(data) == 0:
        raise ConfigError(f"data {config.data!r} (split {config.split!r}) has no examples: check the spec and --split")
    if data.task != teacher.task:
        raise ConfigError(f"the teacher is a {teacher.task} model but the data is for {data.task}: pass matching --task")
    size = teacher.output_size
    if config.method == "topk" and config.k is not None and config.k > size:
        raise ConfigError(f"--k {config.k} is larger than the teacher's output size ({size}): use --k {size} or less")
    if config.tail_samples and _label_sizes(config, data.task, size)[0] >= size:
        raise ConfigError(f"--tail-samples {config.tail_samples} draws from the ids outside the top k, but the top k "
                          f"holds all {size} of them: use a smaller --k, or leave --tail-samples out")
    if data.task == "causal-lm" and data.vocab_size is not None and data.vocab_size > size:
        raise ConfigError(f"the tokenizer has {data.vocab_size:,} ids but the teacher's vocabulary is {size:,}: "
                          "use the teacher's own tokenizer (--tokenizer)")
    if data.task == "classification" and data.num_classes is not None and data.num_classes > size:
        raise ConfigError(f"the data has {data.num_classes} classes but the teacher outputs {size}: "
                          "check the --label-column or the teacher")


def _examples_per_shard(config: GenerateConfig, data: ExampleSet) -> int:
    """About TARGET_SHARD_POSITIONS positions per shard (a power of two of examples), from the first examples."""
    if config.examples_per_shard is not None:
        return config.examples_per_shard
    if data.task == "classification":
        return 8192
    head = [data[i] for i in range(min(len(data), 64))]
    mean = sum(int(x["input_ids"].numel()) for x in head) / len(head)
    return 1 << max(0, int(math.log2(max(1.0, TARGET_SHARD_POSITIONS / max(mean, 1.0)))))


def store_spec(config: GenerateConfig, teacher: LoadedModel, data: ExampleSet, device: torch.device,
                exact_head: bool) -> StoreSpec:
    """The spec of the store ``config`` writes for ``teacher`` on ``data``: sizes, fingerprints, and in ``extra``
    the dtypes the teacher ran in (``exact_head``: its output layer ran in float32, ``float32_output_layer``)."""
    k, tail_samples = _label_sizes(config, data.task, teacher.output_size)
    draws = config.method == "sample" or tail_samples > 0
    compute = compute_dtype(config.precision, device)
    extra = {"compute_dtype": str(compute).removeprefix("torch.")}
    if data.stats:  # what the documents became, for `distill inspect`
        extra["data"] = {**data.stats, **({"attention": packed_attention(teacher)} if data.packed else {})}
    if data.lengths is not None and len(data):  # train-student cuts text as this did, and checks its context
        extra.update(seq_len=config.seq_len or DEFAULT_SEQ_LEN, longest_sequence=int(data.lengths.max()))
    if compute != torch.float32:  # the body ran in 16 bits; say what the logits were computed in
        extra["logits_dtype"] = "float32" if exact_head else extra["compute_dtype"]
    if draws:
        extra["seed"] = config.seed
        if config.sampling != "iid":  # stores from before the choice existed drew iid and say nothing
            extra["sampling"] = config.sampling
    return StoreSpec(
        method=config.method,
        k=k,
        tail_samples=tail_samples,
        vocab_size=teacher.output_size,
        num_examples=len(data),
        examples_per_shard=_examples_per_shard(config, data),
        temperatures=config.temperatures,
        value_encoding=config.stored_value_encoding,
        id_coding=config.id_coding,
        backend=config.backend,
        teacher_fingerprint=teacher.fingerprint,
        dataset_fingerprint=data.fingerprint(),
        sample_temperature=config.sample_temperature if draws else None,
        has_token_index=data.has_position_mask,
        task=data.task,
        extra=extra,
    )


def _open_store(config: GenerateConfig, spec: StoreSpec, team: Workers, say) -> StoreWriter:
    """Rank 0 creates (or checks, or repairs) the store first; the others then reopen it and check their spec."""
    if team.distributed and team.rank != 0:
        team.barrier()
        return create_store(config.out, spec)
    writer = create_store(config.out, spec, overwrite=config.overwrite)
    if config.repair:
        damaged = writer.repair()
        say(f"generate-labels: --repair: {len(damaged)} damaged shard(s) to redo"
            + (f" ({', '.join(map(str, damaged[:20]))}{' ...' if len(damaged) > 20 else ''})" if damaged else ""))
    team.barrier()
    return writer


# --- the loop: teacher on this thread, encoding and writing on another --------------------

def _label_shards(config: GenerateConfig, teacher: LoadedModel, data: ExampleSet, writer: StoreWriter,
                  shards: list[int], device: torch.device, team: Workers, say) -> dict:
    spec = writer.spec
    total = sum(spec.shard_range(i)[1] - spec.shard_range(i)[0] for i in shards)
    progress = Progress(total, label=f"[worker {team.rank}] " if team.world > 1 else "",
                        enabled=config.progress and total > 0)
    examples = positions = written = 0
    sink = _ShardSink(writer, config.queue_size)
    try:
        with torch.inference_mode(), autocast(config.precision, device):
            for index in _claimed(writer, shards, say):
                written += 1
                generator = _shard_generator(config, spec, index, device)
                with _Batches(data, *spec.shard_range(index), config.batch_size, device) as batches:
                    for host, batch in batches:
                        labels, ready = batch_labels(config, teacher, host, batch, spec, generator)
                        sink.append(index, labels, ready)
                        examples += labels.num_examples
                        positions += labels.num_positions
                        progress.update(labels.num_examples, labels.num_positions)
                sink.commit(index)
        sink.close()
    except BaseException:
        sink.abort()
        writer.release()  # the shards in flight stay pending, for whoever comes next
        raise
    finally:
        progress.close()
    return {"shards_written": written, "examples": examples, "positions": positions}


class _Batches:
    """The batches of examples ``start:stop``, collated (and pinned for a GPU) by a thread ahead of the teacher.

    Iterates (host batch, the same batch on ``device``); a collation error surfaces here.
    Used as a context manager: leaving it stops the thread.
    """

    AHEAD = 2  # batches collated ahead

    def __init__(self, data: ExampleSet, start: int, stop: int, batch_size: int, device: torch.device):
        self.data, self.device = data, device
        self.ranges = [(a, min(a + batch_size, stop)) for a in range(start, stop, batch_size)]
        self.queue: queue.Queue = queue.Queue(maxsize=self.AHEAD)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distill-collate", daemon=True)

    def __enter__(self) -> "_Batches":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.thread.join(timeout=60)

    def __iter__(self):
        for _ in self.ranges:
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item, to_device(item, self.device)

    def _run(self) -> None:
        for a, b in self.ranges:
            try:
                item = self.data.gather(torch.arange(a, b))  # == collate of the items, in a few whole-batch reads
                item = pin(item) if self.device.type == "cuda" else item
            except BaseException as e:  # noqa: BLE001 - raised on the teacher's thread
                item = e
            while not self.stop.is_set():
                try:
                    self.queue.put(item, timeout=0.5)
                    break
                except queue.Full:
                    continue
            if self.stop.is_set() or isinstance(item, BaseException):
                return


def _claimed(writer: StoreWriter, shards: list[int], say, poll_s: float = 0.5):
    """``shards``, each yielded once this process holds its lock and it is still pending.

    Shards that another process is writing are waited for: they end complete (skipped
    here) or, if that process dies, their lock frees and this process writes them.
    """
    waiting, told = list(shards), False
    while waiting:
        busy = []
        for index in waiting:
            state = writer.claim(index)
            if state == "claimed":
                yield index
            elif state == "busy":
                busy.append(index)
        if busy:
            if not told:
                say.note(f"generate-labels: another process is writing shard(s) {', '.join(map(str, busy[:10]))}"
                         f"{' ...' if len(busy) > 10 else ''} of this store; waiting for it")
                told = True
            time.sleep(poll_s)
        waiting = busy


def _label_sizes(config: GenerateConfig, task: str, output_size: int) -> tuple[int, int]:
    """(K, M): slots per position (top-k size, or draws of --method sample) and tail draws, defaults resolved."""
    if config.method == "sample":
        return config.samples, 0
    k = config.k or min(DEFAULTS[task].k, output_size)
    tail_samples = config.tail_samples if config.tail_samples is not None else DEFAULTS[task].tail_samples
    return k, tail_samples if k < output_size else 0  # no tail to draw from


def _shard_generator(config: GenerateConfig, spec: StoreSpec, index: int, device: torch.device) -> torch.Generator | None:
    if spec.method != "sample" and not spec.tail_samples:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed * 1_000_003 + index)  # per shard: redone shards draw the same ids
    return generator


def batch_labels(config: GenerateConfig, teacher: LoadedModel, host: dict, batch: dict, spec: StoreSpec,
                  generator: torch.Generator | None) -> tuple[SoftLabels, torch.cuda.Event | None]:
    """Soft labels of one batch, reduced on the device, and the event after which their host copies are complete.

    ``host`` is the collated batch on the host, ``batch`` the same on the teacher's device:
    every size (positions per example, which tokens) is read from the host's copy, so the
    host never waits for the device here. The positions go through the reduction in chunks
    of about ``LOGITS_CHUNK_ELEMENTS`` logits (at most ``CPU_REDUCE_ELEMENTS`` on a CPU; ``distill.pipeline.tasks.Positions``); only a
    padded batch's chunk is copied (its rows gathered), never the whole (positions x vocabulary). Only (P, K + 1 + nT [+ 2M])
    numbers come back to the host, in one asynchronous copy per field.
    """
    logits = teacher.logits(batch)
    token_index = None
    if spec.task == "causal-lm":
        mask = host["position_mask"]  # (B, L) on the host
        lengths = mask.sum(1)  # (B,)
        if spec.has_token_index:
            token_index = (host["position_index"] % mask.shape[1]).to(torch.int32)  # (P,) token of each position
    else:
        lengths = torch.ones(len(logits), dtype=torch.int64)
    positions = Positions.of(batch, spec.task, logits.device)
    # a slice of the teacher's own logits (consumed in place), or a padded batch's chunk gathered: a chunk's copy
    parts = [_reduce(config, spec, positions.rows(logits, span), generator)
             for span in positions.spans(logits.shape[-1], _reduce_elements(logits.device, spec, config))]
    labels = concat_labels(parts) if parts else empty_labels(spec, len(lengths))
    labels.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.to(torch.int64).cumsum(0)])
    labels.token_index = token_index
    if labels.topk_ids.device.type == "cpu":
        return labels, None
    labels = labels.to("cpu", non_blocking=True)  # into pinned memory; the writer thread waits for the event
    ready = torch.cuda.Event()
    ready.record()
    return labels, ready


def _reduce(config: GenerateConfig, spec: StoreSpec, logits: torch.Tensor, generator) -> SoftLabels:
    temps = spec.stored_temperatures
    draws = dict(generator=generator, sample_temperature=spec.sample_temperature or 1.0, sampling=config.sampling,
                 host=False)
    if spec.method == "topk":  # consume: the teacher's logits are overwritten, sparing a (P, V) copy
        return topk_labels(logits, spec.k, temps, consume=True, tail_samples=spec.tail_samples, **draws)
    return sampled_labels(logits, spec.k, temps, consume=True, **draws)


class _ShardSink:
    """A writer thread behind a bounded queue: the teacher never waits on encoding or I/O.

    ``append``/``commit`` enqueue; the thread buffers each shard's batches and writes the
    shard on its commit. An error in the thread surfaces on the next call here.
    """

    def __init__(self, writer: StoreWriter, queue_size: int):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="distill-store-writer", daemon=True)
        self.thread.start()

    def append(self, index: int, labels: SoftLabels, ready: torch.cuda.Event | None = None) -> None:
        """Queue a batch's labels; with ``ready``, their host copies are complete once that event is."""
        self._put(("append", index, (labels, ready)))

    def commit(self, index: int) -> None:
        self._put(("commit", index, None))

    def close(self) -> None:
        self._put(None)
        self.thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without committing what is in flight (the shards stay pending)."""
        self.error = self.error or _Aborted()
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _put(self, item) -> None:
        while True:
            self._raise()
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _raise(self) -> None:
        if self.error is not None and not isinstance(self.error, _Aborted):
            raise self.error

    def _run(self) -> None:
        shards: dict = {}
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain after a failure; the main thread stops at its next put
            kind, index, labels = item
            try:
                if kind == "append":
                    labels, ready = labels
                    if ready is not None:
                        ready.synchronize()  # the device-to-host copies have landed
                    if index not in shards:
                        shards[index] = self.writer.shard(index)
                    shards[index].append(labels)
                else:
                    shard = shards.pop(index, None) or self.writer.shard(index)
                    shard.commit()
                    del shard  # its buffers are free now: give their pages back (distill.pipeline.allocator)
                    release_free_memory()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                self.error = e


class _Aborted(Exception):
    pass


class _Say:
    """Status lines on stderr: ``say(line)`` only with progress; ``say.note(line)`` (the user must act) always."""

    def __init__(self, enabled: bool, progress: bool = True):
        self.enabled, self.progress = enabled, progress

    def __call__(self, line: str) -> None:
        if self.enabled and self.progress:
            print(line, file=sys.stderr, flush=True)

    def note(self, line: str) -> None:
        if self.enabled:
            print(line, file=sys.stderr, flush=True)
