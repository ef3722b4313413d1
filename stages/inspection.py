"""`distill inspect`: what a soft-label store or a training run directory holds.

A store gets the figures from its manifest and commit records (cheap at any size) plus
what the teacher's distributions look like (top-k mass percentiles and histogram, the
entropy over the k+1 buckets, unique ids of sampled labels), read shard by shard: every
shard of a store up to 1 GiB of payload, an evenly spaced sample of a larger one (``sample``
chooses). A run directory (what train-student and train-teacher write) gets its key
settings, how far it got, its last training and held-out metrics, and whether the final
model is saved.
"""

from __future__ import annotations

import dataclasses
import os

from distill import storage
from distill.errors import ConfigError, CorruptStoreError
from distill.pipeline.config import check_settings, setting
from distill.pipeline.files import read_json
from distill.pipeline.rundir import RunDir, is_quantized_dir, is_run_dir, load_run

__all__ = ["InspectConfig", "inspect_path", "run_summary", "format_run"]

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
    return "\n".join(f"{k:<{width}}  {v if v is not None else '-'}" for k, v in rows)


def _metrics_line(line: dict | None, keys: tuple[str, ...]) -> str:
    if not line:
        return "-"
    parts = [f"{k} {line[k]:.4g}" for k in keys if isinstance(line.get(k), (int, float))]
    return f"step {line.get('step', 0):,}: " + ", ".join(parts)
