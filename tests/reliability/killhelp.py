"""Shared by the reliability tests: run distill in-process or killed in a subprocess, compare stores."""

import contextlib
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.storage import open_store

HERE = Path(__file__).resolve().parent
FIELDS = ("offsets", "topk_ids", "topk_logprobs", "tail_logprob", "tempered_lse", "counts", "token_index")
DATA = "faultdata:features"  # 480 train examples of 40 features, like mnist1d but quick
# the commands that run a model: pinned to the CPU, as the references are (auto would take a GPU, in bf16)
DEVICE_COMMANDS = ("generate-labels", "train-student", "train-teacher", "evaluate")
# 12 shards of 40 examples, 4 teacher batches each: every kill point below lands mid-store
GENERATE = ["generate-labels", "--teacher", "slowteacher:fast_factory", "--data", DATA, "--examples-per-shard", "40",
            "--batch-size", "10", "--k", "3", "--temperature", "2", "--no-progress"]


def on_cpu(args) -> list[str]:
    """``distill ARGS`` with ``--device cpu`` after a command that runs a model (and does not name a device itself)."""
    args = [str(a) for a in args]
    if args and args[0] in DEVICE_COMMANDS and "--device" not in args:
        return [args[0], "--device", "cpu", *args[1:]]
    return args


def run(*args, ok=True):
    result = CliRunner().invoke(cli, on_cpu(args))
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread here, as the subprocesses do (OMP_NUM_THREADS=1): bitwise equal arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def killed(point: str, args, env, timeout=240) -> subprocess.CompletedProcess:
    """Run ``distill ARGS`` in a subprocess that SIGKILLs itself at ``point`` (see faults.py); it must die there."""
    proc = subprocess.run([sys.executable, str(HERE / "faults.py"), point, *on_cpu(args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == -9, f"kill point {point} was not reached (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def subprocess_distill(args, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "distill.cli", *on_cpu(args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def decoded(url) -> dict:
    labels = open_store(str(url)).read_all()
    return {f: getattr(labels, f) for f in FIELDS}


def assert_same_store(a, b) -> None:
    da, db = decoded(a), decoded(b)
    for f in FIELDS:
        if da[f] is None or db[f] is None:
            assert da[f] is None and db[f] is None, f
        else:
            assert torch.equal(da[f], db[f]), f"{f} differs"


def commit_records(store) -> dict[str, int]:
    """{record name: mtime_ns} of a store's commit records."""
    return {p.name: p.stat().st_mtime_ns for p in sorted((Path(store) / "shards").glob("*.commit.json"))}


def one_line_error(result, *needles, alone: bool = True) -> str:
    """The CLI's error: exit status 2, one line, no traceback, containing every needle.

    ``alone``: stderr holds nothing else (bad input is refused before any work starts);
    otherwise the error is the last line, after the run's own progress lines.
    """
    err = result.stderr
    assert result.exit_code == 2, f"exit {result.exit_code}: {err}{result.output}"
    assert "Traceback" not in err + result.output and err.count("distill: error: ") == 1, err
    line = err if alone else err.splitlines(keepends=True)[-1]
    assert line.startswith("distill: error: ") and line.count("\n") == 1 and err.endswith(line), err
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line
