"""`distill inspect`: what a soft-label store or a training run directory holds.

A store gets the figures from its manifest and commit records (cheap at any size) plus
what the teacher's distributions look like (top-k mass percentiles and histogram, the
entropy over the k+1 buckets, unique ids of sampled labels), read shard by shard: every
shard of a store up to 1 GiB of payload, an evenly spaced sample of a larger one (``sample``
chooses). A run directory (what train-student and train-teacher write) gets its key
settings, how far it got, its last training and held-out metrics, and whether the final
model is saved. Both show provenance as a chain, ``lineage``: student <- store <- teacher
(<- the teacher's own run directory), each link with its fingerprints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

from distill import storage
from distill.errors import ConfigError, CorruptStoreError, StoreError
from distill.pipeline.config import check_settings, setting
from distill.pipeline.files import read_json
from distill.pipeline.rundir import RunDir, is_quantized_dir, is_run_dir, load_run

__all__ = ["InspectConfig", "inspect_path", "run_summary", "format_run", "store_lineage", "format_provenance",
           "format_lineage"]

HASHED_STUDENT_BYTES = 4 << 30  # a student's weight files are hashed for its lineage up to this size (seconds)
# the settings a reader of a run wants first, in this order (student-only ones when present)
KEY_SETTINGS = ("model", "data", "split", "eval_split", "labels", "loss", "temperature", "alpha", "lr",
                "batch_size", "grad_accum", "epochs", "steps", "seed")


@dataclasses.dataclass(frozen=True)
class InspectConfig:
    """Settings of `distill inspect` (each field's help is its flag's)."""

    path: str = setting(dataclasses.MISSING, "A store (path or fsspec URL), a run directory or a quantize output.",
                        cli=False)
    verify: bool = setting(False, "Check every shard's checksums; exit 1 if any is damaged.")
    sample: int | None = setting(None, "Shards read for a store's top-k mass and entropy figures: N evenly spaced, "
                                       "0 every shard.", minimum=0,
                                 default_help="every shard up to 1 GiB of payload, else a sample")

    def __post_init__(self):
        check_settings(self)


def inspect_path(config: InspectConfig) -> dict:
    """``{"kind": "store" | "run" | "quantized", "summary": dict}`` for the store, run or quantize directory at ``config.path``."""
    path = config.path
    if is_run_dir(path):
        return {"kind": "run", "summary": run_summary(load_run(path))}
    if "://" not in path and is_quantized_dir(path):
        return {"kind": "quantized", "summary": read_json(os.path.join(path, "summary.json")) or {}}
    if "://" not in path and os.path.exists(path) and not os.path.exists(os.path.join(path, "manifest.json")):
        raise ConfigError(f"{path} is neither a soft-label store (no manifest.json) nor a run directory (no config.json "
                          "from train-student or train-teacher): pass one of those")
    try:
        reader = storage.open_store(path)
    except CorruptStoreError as e:  # a damaged commit record: --verify lists its shard with the others
        if not config.verify or e.shard is None:
            raise
        reader = storage.open_store(path, damaged_records_ok=True)
    summary = reader.summary(verify=config.verify)
    summary.update(storage.label_figures(reader, config.sample, skip=summary.get("shards_unreadable", ())))
    spec = getattr(reader, "spec", None)  # None: a reader that knows its figures alone (tests/test_cli.py's)
    if spec is not None:
        if isinstance(spec.extra.get("provenance"), dict):  # stores made before provenance was recorded have none
            summary["provenance"] = spec.extra["provenance"]
        summary["lineage"] = store_lineage(path, spec)
    return {"kind": "store", "summary": summary}


# --- run directories --------------------------------------------------------------------------

def run_summary(run: RunDir) -> dict:
    """The figures `distill inspect RUN_DIR` prints (one JSON-able dict)."""
    config = run.config
    checkpoint_step = None
    if run.checkpoint is not None:
        checkpoint_step = int(os.path.basename(run.checkpoint).removeprefix("step-"))
    steps_done = max([m.get("step", 0) for m in run.train + run.evals] + [checkpoint_step or 0])
    return {
        "run_dir": run.path,
        "stage": run.stage,
        "config": {k: config[k] for k in KEY_SETTINGS if k in config},
        "steps_done": steps_done,
        "latest_checkpoint": run.checkpoint,
        "checkpoint_step": checkpoint_step,
        "last_train": run.train[-1] if run.train else None,
        "last_eval": run.evals[-1] if run.evals else None,
        "finished": run.summary is not None,
        "final_model": run.final_model,
        "params": run.params,
        "lineage": _run_lineage(run),
    }


def format_run(summary: dict) -> str:
    """``run_summary``'s figures as aligned lines for a person."""
    c = summary["config"]
    length = f"{c['steps']:,} steps" if c.get("steps") else f"{c.get('epochs') or 1} epoch(s)"
    rows = [("run directory", f"{summary['run_dir']} ({summary['stage']})"), ("model", c.get("model")),
            ("data", f"{c.get('data')} (split {c.get('split', 'train')}; held out: {c.get('eval_split') or '-'})")]
    if c.get("labels"):
        rows += [("labels", c["labels"]),
                 ("loss", f"{c.get('loss')}, temperature {c.get('temperature'):g}, alpha {c.get('alpha'):g}")]
    rows += [("optimiser", f"lr {c.get('lr'):g}, batch size {c.get('batch_size')} x {c.get('grad_accum', 1)}, {length}"),
             ("steps done", f"{summary['steps_done']:,}" + (f" (latest checkpoint: step {summary['checkpoint_step']:,})"
                                                           if summary["checkpoint_step"] is not None else " (no checkpoint)")),
             ("last training", _metrics_line(summary["last_train"], ("loss", "soft", "ce", "lr"))),
             ("last eval", _metrics_line(summary["last_eval"], ("accuracy", "perplexity", "loss"))),
             ("final model", (f"yes ({os.path.join(summary['run_dir'], 'model')}" +
                              (f", {summary['params']:,} parameters)" if summary["params"] else ")"))
              if summary["final_model"] else "no (the run has not finished)")]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v if v is not None else '-'}" for k, v in rows]
    return "\n".join(lines + format_lineage(summary.get("lineage") or []))


def _metrics_line(line: dict | None, keys: tuple[str, ...]) -> str:
    if not line:
        return "-"
    parts = [f"{k} {line[k]:.4g}" for k in keys if isinstance(line.get(k), (int, float))]
    return f"step {line.get('step', 0):,}: " + ", ".join(parts)


# --- provenance and lineage -----------------------------------------------------------------------

def store_lineage(url: str, spec: storage.StoreSpec) -> list[dict]:
    """The chain behind a store: ``[{"link": "store", ...}, {"link": "teacher", ...}, {"link": "teacher run", ...}]``.

    The store carries its own fingerprints; the teacher link is what its provenance records
    (just the fingerprint for a store made before provenance was); the teacher-run link is
    there when the teacher was trained with train-teacher and its run directory is still here.
    """
    provenance = spec.extra.get("provenance") if isinstance(spec.extra.get("provenance"), dict) else {}
    teacher = provenance.get("teacher") if isinstance(provenance.get("teacher"), dict) else {}
    chain = [{"link": "store", "path": url, "teacher_fingerprint": spec.teacher_fingerprint,
              "dataset_fingerprint": spec.dataset_fingerprint,
              "dataset": (provenance.get("dataset") or {}).get("spec"), "created": provenance.get("created")},
             {"link": "teacher", "path": teacher.get("spec"), "fingerprint": spec.teacher_fingerprint,
              **{k: teacher.get(k) for k in ("name_or_path", "architecture", "revision", "parameters", "license")},
              "license_acknowledged": provenance.get("license_acknowledged"),
              "recorded_fingerprint_matches": teacher.get("weights_fingerprint") in (None, spec.teacher_fingerprint)}]
    run_dir = teacher.get("run_dir")
    if run_dir and is_run_dir(run_dir):
        run = load_run(run_dir)
        chain.append({"link": "teacher run", "path": run_dir, "stage": run.stage, "model": run.config.get("model"),
                      "data": run.config.get("data")})
    return chain


def _run_lineage(run: RunDir) -> list[dict]:
    """A student run's chain, ``[{"link": "student", ...}, *store_lineage]``; [] for a teacher's run."""
    labels = run.config.get("labels")
    if not labels:
        return []
    card = os.path.join(run.path, "model", "README.md")
    card_text = open(card, encoding="utf-8").read() if os.path.isfile(card) else None
    student = {"link": "student", "path": run.path, "model": run.config.get("model"),
               "weights_sha256": _weights_digest(os.path.join(run.path, "model"))}
    try:
        spec = storage.open_store(labels).spec
    except (OSError, ValueError, ConfigError, StoreError) as e:  # moved or deleted since: say so, go on
        return [student, {"link": "store", "path": labels, "error": str(e).splitlines()[0]}]
    # the card (train-student's model/README.md) names the fingerprints of the store it was trained from
    student["card_names_store_fingerprints"] = None if card_text is None else all(
        f in card_text for f in (spec.teacher_fingerprint, spec.dataset_fingerprint))
    return [student, *store_lineage(labels, spec)]


def _weights_digest(model_dir: str) -> str | None:
    """sha256 over the model's weight files in name order (None when there are none, or they are too big)."""
    if not os.path.isdir(model_dir):
        return None
    files = sorted(f for f in os.listdir(model_dir) if f.endswith((".safetensors", ".pt", ".bin")))
    paths = [os.path.join(model_dir, f) for f in files]
    if not paths or sum(os.path.getsize(p) for p in paths) > HASHED_STUDENT_BYTES:
        return None
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def format_provenance(provenance: dict | None) -> list[str]:
    """A store's ``extra["provenance"]`` as indented lines for a person ([] when the store has none)."""
    if not provenance:
        return []
    teacher, dataset = provenance.get("teacher") or {}, provenance.get("dataset") or {}
    described = ", ".join(str(v) for v in (teacher.get("name_or_path"), teacher.get("architecture")) if v)
    rows = [("teacher", f"{teacher.get('spec')}" + (f" ({described})" if described else "")),
            ("teacher revision", teacher.get("revision")),
            ("teacher parameters", f"{teacher['parameters']:,}" if teacher.get("parameters") else None),
            ("teacher licence", (f"{teacher['license']} (from {teacher.get('license_source')})"
                                 if teacher.get("license") else "unknown")),
            ("licence acknowledged", provenance.get("license_acknowledged")),
            ("dataset", f"{dataset.get('spec')} (split {dataset.get('split')}, {dataset.get('examples', 0):,} examples)"
             if dataset else None),
            ("dataset licence", dataset.get("license")),
            ("made by", f"distill {provenance.get('tool_version')} on {provenance.get('created')}"),
            ("command", provenance.get("command"))]
    width = max(len(k) for k, _ in rows)
    return ["provenance"] + [f"  {k:<{width}}  {v}" for k, v in rows if v is not None]


def format_lineage(chain: list[dict]) -> list[str]:
    """``store_lineage`` (or a run's lineage) as lines: each link, its path and fingerprints, newest first."""
    if not chain:
        return []
    lines = ["lineage"]
    for i, link in enumerate(chain):
        name = ("<- " if i else "   ") + link["link"]
        if "error" in link:
            lines.append(f"  {name:<15}  {link['path']}: cannot be read ({link['error']})")
            continue
        if link["link"] == "student":
            card = link.get("card_names_store_fingerprints")
            detail = f"weights {link.get('weights_sha256') or '-'}" + (
                "" if card is None else f"; its card names the store's fingerprints: {'yes' if card else 'NO'}")
        elif link["link"] == "store":
            detail = f"teacher {link['teacher_fingerprint']}, dataset {link['dataset_fingerprint']}"
        elif link["link"] == "teacher":
            detail = f"{link['fingerprint']}" + (f", licence {link['license']}" if link.get("license") else "") + (
                "" if link.get("recorded_fingerprint_matches", True) else " (the provenance records another one)")
        else:
            detail = f"{link.get('stage')}: {link.get('model')} on {link.get('data')}"
        lines.append(f"  {name:<15}  {link.get('path') or '-'}  {detail}")
    return lines
