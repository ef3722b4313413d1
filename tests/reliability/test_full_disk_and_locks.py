"""A full disk in stage one or at a checkpoint, and two generate-labels processes on one store."""

import errno
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import distill.storage.fs as store_fs
from distill.pipeline.checkpoint import latest_checkpoint
from distill.storage import open_store
from distill.storage.fs import StoreFS

from killhelp import DATA, GENERATE, assert_same_store, commit_records, on_cpu, one_line_error, one_thread, run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "store"
    run(*GENERATE, "--out", out)
    return out


class _FullDisk:
    """``open`` for distill.storage.fs: the Nth file written there gets half its bytes, then ENOSPC."""

    def __init__(self, nth: int, kind: str):
        self.nth, self.kind, self.calls = nth, kind, 0

    def __call__(self, path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        name = os.path.basename(str(path))
        kind = "commit" if ".commit.json" in name else "manifest" if name.startswith("manifest.json") else "data"
        if "w" in mode and kind == self.kind:
            self.calls += 1
            if self.calls == self.nth:
                return _FailingFile(f)
        return f


class _FailingFile:
    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()
        return False

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.parametrize("nth, kind", [(13, "data"), (3, "commit"), (2, "manifest")],
                         ids=["shard-file", "commit-record", "sealing-manifest"])
def test_a_full_disk_in_stage_one_is_one_line_and_a_rerun_completes(nth, kind, reference, tmp_path, monkeypatch):
    out = tmp_path / "store"
    monkeypatch.setattr(store_fs, "open", _FullDisk(nth, kind), raising=False)
    result = run(*GENERATE, "--out", out, ok=False)
    one_line_error(result, "no space left writing", "free some space", "rerun", alone=False)
    monkeypatch.undo()
    reader = open_store(str(out))
    assert not reader.manifest.finalized  # nothing sealed that is not complete
    assert (reader.verify() == []) == (kind == "manifest")
    assert all(reader.read_shard(i).num_examples == 40 for i in reader.complete_shards())  # what is complete is whole
    assert not list((out / "shards").glob("*.tmp-*")), "a failed atomic write leaves no temporary file"
    before = commit_records(out)
    run(*GENERATE, "--out", out)  # space freed: the same command completes
    assert {k: v for k, v in commit_records(out).items() if k in before} == before
    assert_same_store(reference, out)


def _train(labels, out, *extra):
    return run("train-student", "--labels", labels, "--student", "faultdata:student", "--data", DATA, "--steps", 12,
               "--batch-size", 32, "--checkpoint-every", 4, "--workers", 0, "--no-progress", "--out", out, *extra,
               ok=False)


@pytest.mark.parametrize("fails", ["torch.save", "safetensors"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_a_rerun_completes(fails, reference, tmp_path, monkeypatch):
    import distill.pipeline.checkpoint as checkpoint

    with one_thread():
        assert _train(reference, tmp_path / "whole").exit_code == 0
    calls = {"n": 0}
    real_save, real_weights = torch.save, checkpoint.save_weights

    def full_on_second(real, error):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise error
            return real(*args, **kwargs)
        return write

    if fails == "torch.save":  # what torch raises when its writer meets a full disk
        monkeypatch.setattr(torch, "save", full_on_second(real_save, RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")))
    else:
        monkeypatch.setattr(checkpoint, "save_weights", full_on_second(real_weights, OSError(errno.ENOSPC, "No space left on device")))
    out = tmp_path / "run"
    with one_thread():
        line = one_line_error(_train(reference, out), "checkpoint", "step-00000008", "free", alone=False)
    assert ("no space left" in line) == (fails == "safetensors")  # torch's own message does not say why
    monkeypatch.undo()
    assert latest_checkpoint(str(out)).endswith("step-00000004")  # the failed one is not taken for complete
    assert [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(("step-", "."))] == ["step-00000004"]
    with one_thread():
        assert _train(reference, out).exit_code == 0
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_writer_waits_for_the_shard_another_holds_and_both_end_sealed(reference, tmp_path):
    out = tmp_path / "store"
    run(*GENERATE, "--out", out, "--examples-per-shard", 40, "--shard", "0/2")  # the store exists, half done
    held = StoreFS(str(out)).try_lock("shards/000003.lock")  # "another process" is writing shard 3
    assert held is not None
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=run(*GENERATE, "--out", out, ok=False)))
    worker.start()
    deadline = time.monotonic() + 60
    while len(commit_records(out)) < 11 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    assert "000003.commit.json" not in commit_records(out) and worker.is_alive(), "shard 3 is left to its holder"
    assert StoreFS(str(out)).try_lock("shards/000003.lock") is None
    held.release()  # the holder died (kill -9 frees a flock the same way): the waiting writer takes the shard
    worker.join(60)
    assert result["r"].exit_code == 0, result["r"].stderr
    assert "another process is writing shard(s) 3" in result["r"].stderr
    assert open_store(str(out)).manifest.finalized
    assert_same_store(reference, out)
    assert not list((out / "shards").glob("*.lock")), "lock files go once their shard is committed"


@pytest.mark.slow
def test_two_processes_started_on_one_store_split_it_without_damage(reference, tmp_path, helper_env):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "distill.cli", *on_cpu([*GENERATE, "--teacher", "slowteacher:factory", "--out", out])]
    procs = [subprocess.Popen(cmd, env=helper_env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    reader = open_store(str(out))
    assert reader.manifest.finalized and reader.verify() == []
    assert_same_store(reference, out)
