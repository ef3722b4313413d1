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
import json
import os

from distill.errors import ConfigError, CorruptStoreError

__all__ = ["InspectConfig", "RunDir", "inspect_path", "is_run_dir", "load_run", "run_summary", "format_run", "eval_metric"]

# the settings a reader of a run wants first, in this order (student-only ones when present)
KEY_SETTINGS = ("model", "data", "split", "eval_split", "labels", "loss", "temperature", "alpha", "lr",
                "batch_size", "grad_accum", "epochs", "steps", "seed")


@dataclasses.dataclass(frozen=True)
class InspectConfig:
    """Settings of `distill inspect`.

    path:   a store (path or fsspec URL) or a local run directory.
    verify: read and check every shard of a store; damaged ones are listed.
    sample: shards read for a store's distribution figures: None, every shard up to 1 GiB of
            payload and an evenly spaced sample beyond; 0, every shard; N, at most N.
    """

    path: str
    verify: bool = False
    sample: int | None = None

    def __post_init__(self):
        if self.sample is not None and self.sample < 0:
            raise ConfigError(f"--sample must be >= 0 (0: every shard), got {self.sample}")


def inspect_path(config: InspectConfig) -> dict:
    """``{"kind": "store" | "run", "summary": dict}`` for the store or run directory at ``config.path``."""
    from distill import storage

    path = config.path
    if is_run_dir(path):
        return {"kind": "run", "summary": run_summary(load_run(path))}
    quantized = os.path.join(path, "summary.json")
    if "://" not in path and os.path.isfile(quantized) and os.path.isfile(os.path.join(path, "model", "model.pt")):
        with open(quantized) as f:  # a `distill quantize` output directory
            return {"kind": "quantized", "summary": json.load(f)}
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
    figures = getattr(reader, "label_figures", None)  # a reader that cannot read shards gives the record figures only
    if figures is not None:
        summary.update(figures(config.sample, skip=summary.get("shards_unreadable", ())))
    return {"kind": "store", "summary": summary}


# --- run directories --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run directory as read from disk.

    config:     config.json (the run's settings).
    train:      the training lines of metrics.jsonl ({"step", "loss", "soft", "ce", "lr", ...}), in order.
    evals:      its held-out lines, each {"step", **eval} ({"accuracy" | "perplexity", "loss", ...}).
    summary:    summary.json (written at the end), or None.
    checkpoint: the newest complete checkpoint's directory, or None.
    """

    path: str
    config: dict
    train: list[dict]
    evals: list[dict]
    summary: dict | None
    checkpoint: str | None

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path)) or self.path

    @property
    def stage(self) -> str:
        return "train-student" if self.config.get("labels") else "train-teacher"

    @property
    def final_model(self) -> bool:
        model = os.path.join(self.path, "model")
        return any(os.path.isfile(os.path.join(model, f)) for f in ("model.safetensors", "config.json"))

    @property
    def params(self) -> int | None:
        return (self.summary or {}).get("params")


def is_run_dir(path: str) -> bool:
    """True for a local directory whose config.json is a training run's (it names the model and the data)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model" in config and "data" in config and "out" in config


def load_run(path: str) -> RunDir:
    """Read the run directory at ``path``; a path that is not one is a ConfigError."""
    from distill.pipeline.checkpoint import latest_checkpoint

    if not os.path.exists(path):
        raise ConfigError(f"no run directory at {path}: check the path (train-student and train-teacher write one with --out)")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not a run directory (no config.json from train-student or train-teacher): "
                          "pass the --out of a training run")
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    train, evals = [], []
    for line in _metric_lines(os.path.join(path, "metrics.jsonl")):
        if "eval" in line:
            evals.append({"step": line.get("step"), **line["eval"]})
        else:
            train.append(line)
    summary = None
    if os.path.isfile(os.path.join(path, "summary.json")):
        with open(os.path.join(path, "summary.json")) as f:
            summary = json.load(f)
    return RunDir(path, config, train, evals, summary, latest_checkpoint(path))


def _metric_lines(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    lines = []
    with open(path) as f:
        for raw in f:
            try:
                line = json.loads(raw)
            except ValueError:  # a torn last line from a crash
                continue
            if isinstance(line, dict):
                lines.append(line)
    return lines


def eval_metric(evaluation: dict) -> tuple[str, float] | None:
    """The headline held-out metric of an eval record: accuracy or perplexity (else None)."""
    for name in ("accuracy", "perplexity"):
        if isinstance(evaluation.get(name), (int, float)):
            return name, float(evaluation[name])
    return None


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
