"""quantize, report and demo on a full disk or a read-only directory: the one-line WriteError train gives, exit 2."""

import errno
import os

import pytest
import torch

import distill.storage.fs as store_fs

from killhelp import DATA, one_line_error, run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory of a small trained model, to quantize and report on."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run("train-teacher", "--model", "faultdata:student", "--data", DATA, "--steps", 2, "--workers", 0, "--no-progress",
        "--out", out)
    return out


def full_disk_for(name: str):
    """``open`` for distill.storage.fs (every atomic file write): writing a file named ``name*`` fails with ENOSPC."""

    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode and os.path.basename(str(path)).startswith(name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, mode, *args, **kwargs)

    return opener


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if ".tmp" in p.name)


def test_quantize_on_a_full_disk_is_one_line_leaves_no_model_and_a_rerun_completes(trained, tmp_path, monkeypatch):
    out = tmp_path / "q"
    real_save = torch.jit.save

    def full(*args, **kwargs):  # what torch's writer raises when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch.jit, "save", full)
    one_line_error(run("quantize", "--model", trained, "--out", out, ok=False), "cannot write the quantized model",
                   "writable directory")
    assert not (out / "model").exists() and leftovers(tmp_path) == []
    monkeypatch.setattr(torch.jit, "save", real_save)
    monkeypatch.setattr(store_fs, "open", full_disk_for("summary.json"), raising=False)
    one_line_error(run("quantize", "--model", trained, "--out", out, ok=False), "no space left writing",
                   "summary.json", alone=False)
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    run("quantize", "--model", trained, "--out", out)  # space freed: the same command completes
    assert (out / "summary.json").is_file() and (out / "model" / "model.pt").is_file()


def test_quantize_into_a_read_only_directory_is_one_line(trained, read_only):
    one_line_error(run("quantize", "--model", trained, "--out", read_only / "q", ok=False), "cannot write",
                   "writable directory")
    assert not (read_only / "q" / "model").exists()


def test_report_on_a_full_disk_or_read_only_directory_is_one_line_and_leaves_no_page(trained, tmp_path, read_only,
                                                                                       monkeypatch):
    one_line_error(run("report", trained, "--out", read_only / "report.html", ok=False), "cannot write",
                   "writable directory")
    monkeypatch.setattr(store_fs, "open", full_disk_for("report.html"), raising=False)
    one_line_error(run("report", trained, "--out", tmp_path / "report.html", ok=False), "no space left writing",
                   "free some space", alone=False)
    assert not (tmp_path / "report.html").exists() and leftovers(tmp_path) == []


def test_demo_on_a_full_disk_or_read_only_directory_is_one_line(tmp_path, read_only, monkeypatch):
    one_line_error(run("demo", "--quick", "--device", "cpu", "--out", read_only / "demo", ok=False), "cannot write",
                   "writable directory")
    monkeypatch.setattr(store_fs, "open", full_disk_for("config.json"), raising=False)  # the teacher run's first file
    one_line_error(run("demo", "--quick", "--device", "cpu", "--out", tmp_path / "demo", ok=False), "no space left writing",
                   "free some space", alone=False)
    assert leftovers(tmp_path) == []
