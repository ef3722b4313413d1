"""kill -9 of `distill train-student` between and during checkpoint writes: the rerun ends with the same weights."""

import pytest
import torch
from safetensors.torch import load_file

from distill.pipeline.checkpoint import latest_checkpoint

from killhelp import DATA, GENERATE, killed, one_thread, run

# 2 epochs of 15 steps, a checkpoint every 4 steps (mid-epoch) and at the end
DEFAULT_POINTS = ["checkpoint:3:during"]
SWEEP = [*(f"checkpoint:{n}:{phase}" for n in (1, 4, 5) for phase in ("during", "pointer", "after")),
         "forward:1:during", "forward:15:after", "forward:16:during", "forward:27:during", "checkpoint:8:pointer"]


def train_args(labels, out):
    return ["train-student", "--labels", labels, "--student", "faultdata:student", "--data", DATA, "--epochs", 2,
            "--batch-size", 32, "--checkpoint-every", 4, "--workers", 0, "--shuffle-buffer", 64, "--no-progress",
            "--out", out]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "store"
    run(*GENERATE, "--out", out)
    return out


@pytest.fixture(scope="module")
def reference(labels, tmp_path_factory):
    """The uninterrupted run's final weights, on one thread like the killed subprocesses (OMP_NUM_THREADS=1)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    with one_thread():
        run(*train_args(labels, out))
    return load_file(out / "model" / "model.safetensors")


def _kill_then_rerun(point, labels, reference, out, env):
    killed(point, train_args(labels, out), env)
    assert not (out / "model").exists()
    if point.endswith(("during", "pointer")) and point.startswith("checkpoint"):
        n = int(point.split(":")[1])
        ckpt = latest_checkpoint(str(out))
        # the checkpoint before stays the latest; with none before, a renamed-in directory is found without the pointer
        expect = 4 * (n - 1) if n > 1 else (None if point.endswith("during") else 4)
        assert (ckpt is None) if expect is None else ckpt.endswith(f"step-{expect:08d}"), ckpt
    with one_thread():  # the rerun in this process: the same arithmetic as the killed run's
        run(*train_args(labels, out))
    weights = load_file(out / "model" / "model.safetensors")
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name], "leftovers are cleaned up"


@pytest.mark.parametrize("point", DEFAULT_POINTS)
def test_kill_9_during_a_checkpoint_then_rerun_gives_the_same_weights(point, labels, reference, tmp_path, helper_env):
    _kill_then_rerun(point, labels, reference, tmp_path / "run", helper_env)


@pytest.mark.slow
@pytest.mark.parametrize("point", SWEEP)
def test_kill_9_sweep_then_rerun_gives_the_same_weights(point, labels, reference, tmp_path, helper_env):
    _kill_then_rerun(point, labels, reference, tmp_path / "run", helper_env)
