"""Run directories: what train-teacher and train-student write, and inspect, report and quantize read.

A run directory holds ``config.json`` (the run's settings), ``metrics.jsonl`` (one JSON
object per line: training lines, and held-out lines ``{"step", "eval": {...}}``),
``checkpoints/`` and, at the end, ``model/`` and ``summary.json``. A `distill quantize`
output directory holds ``model/`` (model.pt, model.json) and ``summary.json`` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from distill.errors import ConfigError, write_error
from distill.pipeline.checkpoint import latest_checkpoint
from distill.pipeline.config import config_to_dict
from distill.pipeline.files import read_json, write_json

__all__ = ["RunDir", "is_run_dir", "is_quantized_dir", "load_run", "eval_metric", "prepare_run_dir",
           "RESUMABLE_CHANGES"]

# settings that may change between a run and its resumption
RESUMABLE_CHANGES = ("progress", "workers", "device", "log_every", "checkpoint_every", "eval_every", "overwrite",
                     "log_to", "gradient_checkpointing",  # these two change how, not what, it computes
                     "license")  # only the model card's metadata


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
    config = read_json(os.path.join(path, "config.json"))
    return isinstance(config, dict) and "model" in config and "data" in config and "out" in config


def is_quantized_dir(path: str) -> bool:
    """True for a `distill quantize` output directory: its summary.json beside model/model.pt."""
    summary = read_json(os.path.join(path, "summary.json"))
    return isinstance(summary, dict) and "quantized_linears" in summary and \
        os.path.isfile(os.path.join(path, "model", "model.pt"))


def load_run(path: str) -> RunDir:
    """Read the run directory at ``path``; a path that is not one is a ConfigError."""
    if not os.path.exists(path):
        raise ConfigError(f"no run directory at {path}: check the path (train-student and train-teacher write one with --out)")
    if not is_run_dir(path):
        raise ConfigError(f"{path} is not a run directory (no config.json from train-student or train-teacher): "
                          "pass the --out of a training run")
    train, evals = [], []
    for line in _metric_lines(os.path.join(path, "metrics.jsonl")):
        if "eval" in line:
            evals.append({"step": line.get("step"), **line["eval"]})
        else:
            train.append(line)
    summary = read_json(os.path.join(path, "summary.json"))
    return RunDir(path, read_json(os.path.join(path, "config.json")), train, evals,
                  summary if isinstance(summary, dict) else None, latest_checkpoint(path))


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


def prepare_run_dir(config, rank: int = 0) -> None:
    """Make ``config.out`` a new run directory for ``config`` (a training config), or keep it to resume.

    A directory holding the same run (settings equal but for RESUMABLE_CHANGES) with a
    checkpoint is resumed; one holding a run with other settings is refused unless
    ``config.overwrite``; anything else that is not empty is refused. Only rank 0 touches
    the disk (the caller waits for it at a barrier).
    """
    if rank != 0:
        return
    path = os.path.join(config.out, "config.json")
    if os.path.exists(config.out) and not os.path.isdir(config.out):
        raise ConfigError(f"{config.out} is a file, not a run directory: choose a new --out")
    if os.path.isfile(path) and not config.overwrite and latest_checkpoint(config.out) is not None:
        _check_same_run(config, path)
    elif os.path.isdir(config.out) and os.listdir(config.out):
        if not os.path.isfile(path):
            raise ConfigError(f"{config.out} exists and is not a distill run directory: choose a new --out")
        shutil.rmtree(config.out)
    if not os.path.isfile(path):
        try:
            os.makedirs(config.out, exist_ok=True)
        except OSError as e:
            raise write_error(e, f"the run directory {config.out}") from None
        write_json(path, config_to_dict(config))


def _check_same_run(config, path: str) -> None:
    mine = {k: v for k, v in config_to_dict(config).items() if k not in RESUMABLE_CHANGES}
    saved = read_json(path)
    if not isinstance(saved, dict):
        raise ConfigError(f"{path} is damaged: use --overwrite to start over, or a new --out")
    theirs = {k: v for k, v in saved.items() if k not in RESUMABLE_CHANGES}
    for field in dataclasses.fields(config):  # a setting added since the run was made: the run had its default
        if field.name not in saved and field.default is not dataclasses.MISSING:
            theirs[field.name] = list(field.default) if isinstance(field.default, tuple) else field.default
    diff = next((k for k in mine if mine[k] != theirs.get(k)), None)
    if diff is not None:
        raise ConfigError(f"{config.out} holds a run with {diff}={theirs.get(diff)!r}, not {mine[diff]!r}: "
                          "use a new --out, or --overwrite to start over")
