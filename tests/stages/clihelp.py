"""Running `distill` commands in the test process, on the CPU, and reading what a run wrote."""

import json
from pathlib import Path

from click.testing import CliRunner

from distill.cli import cli

QUIET = ("generate-labels", "train-student", "train-teacher")  # the commands that take --no-progress


def run(command, *args, ok=True):
    """``distill COMMAND ARGS`` in this process, on the CPU (auto would take a GPU, and bf16 with it)."""
    quiet = ["--no-progress"] if command in QUIET else []
    result = CliRunner().invoke(cli, [command, *quiet, "--device", "cpu", *map(str, args)])
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


def metrics(run_dir):
    """The lines of a run directory's metrics.jsonl."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
