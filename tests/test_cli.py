"""The command line: version, help, and user errors as one line with exit status 2."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import distill
from distill.cli import cli
from distill.errors import StoreError

SUMMARY = {
    "format_version": 1, "method": "topk", "backend": "zarr", "examples": 1000,
    "positions": 64000, "k": 32, "vocab_size": 32000, "temperatures": [1.0, 2.0],
    "shards_complete": 4, "shards_total": 4, "payload_bytes": 12_345_678,
    "bytes_per_position": 192.9, "bytes_per_entry": 6.03, "topk_mass_mean": 0.9712,
    "value_encoding": "sqrt",
}


class FakeReader:
    def __init__(self, damaged=()):
        self.damaged = list(damaged)

    def summary(self, verify=False):
        return {**SUMMARY, "damaged_shards": self.verify()} if verify else dict(SUMMARY)

    def verify(self):
        return self.damaged


def _import_store_users():
    """Import the modules that bind ``open_store`` by name before it is patched: imported first under the patch,
    they would keep the fake for the rest of the session (and later tests' real stores would not open)."""
    for name in ("distill.stages.generate", "distill.stages.importing", "distill.stages.inspection",
                 "distill.pipeline.labelstore"):
        importlib.import_module(name)


@pytest.fixture
def fake_store(monkeypatch):
    """Point `distill.storage.open_store` at a FakeReader; returns the reader to tweak."""
    import distill.storage

    _import_store_users()

    reader = FakeReader()
    monkeypatch.setattr(distill.storage, "open_store", lambda url: reader, raising=False)
    monkeypatch.setattr(distill.storage, "label_figures", lambda *args, **kwargs: {})  # it has no shards to read
    return reader


def run(*args):
    return CliRunner().invoke(cli, list(args), prog_name="distill")


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"distill {distill.__version__}\n"


def test_help_lists_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "inspect" in result.output and "demo" in result.output


def test_unknown_flag_is_usage_error():
    assert run("inspect", "--no-such-flag", "x").exit_code == 2


def test_distill_error_is_one_line_and_exit_2(monkeypatch):
    import distill.storage

    _import_store_users()

    def open_store(url):
        raise StoreError(f"no soft-label store at {url}; check the path")

    monkeypatch.setattr(distill.storage, "open_store", open_store, raising=False)
    result = run("inspect", "nowhere")
    assert result.exit_code == 2
    assert result.stderr == "distill: error: no soft-label store at nowhere; check the path\n"
    assert "Traceback" not in result.output


def test_inspect_json(fake_store):
    result = run("inspect", "store", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == SUMMARY
    assert result.stdout.count("\n") == 1


def test_inspect_human(fake_store):
    result = run("inspect", "store")
    assert result.exit_code == 0
    assert "11.77 MiB" in result.stdout
    assert "4 of 4 complete" in result.stdout


def test_inspect_verify_damaged_exits_1(fake_store):
    fake_store.damaged = [{"shard": 3, "error": "checksum mismatch in topk_ids"}]
    result = run("inspect", "store", "--verify", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["damaged_shards"] == fake_store.damaged
    human = run("inspect", "store", "--verify")
    assert human.exit_code == 1
    assert "shard 3: checksum mismatch in topk_ids" in human.stdout


def test_inspect_missing_store_real_storage(tmp_path):
    import distill.storage

    if not hasattr(distill.storage, "open_store"):
        pytest.skip("distill.storage.open_store not written yet")
    result = run("inspect", str(tmp_path / "missing"))
    assert result.exit_code == 2
    assert result.stderr.startswith("distill: error: ")
    assert result.stderr.count("\n") == 1


def test_a_missing_argument_is_a_usage_error_exit_2():
    result = CliRunner().invoke(cli, ["inspect"])
    assert result.exit_code == 2 and "Missing argument" in result.output


def test_console_script_subprocess(tmp_path):
    """The installed `distill` script: --version works and a user error is one line, exit 2 (a usage error's
    exit 2 is checked in process: each command that imports torch costs the subprocess seconds)."""
    script = Path(sys.executable).parent / "distill"
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    version = subprocess.run([script, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"distill {distill.__version__}\n")
    from distill import storage

    if hasattr(storage, "open_store"):
        missing = subprocess.run([script, "inspect", "missing"], capture_output=True, text=True, cwd=tmp_path)
        assert missing.returncode == 2
        assert missing.stderr.startswith("distill: error: ") and missing.stderr.count("\n") == 1


def test_python_dash_m_distill_is_the_command(tmp_path):
    """`python -m distill` (what `torchrun -m distill` runs) is the same command, exit codes included."""
    version = subprocess.run([sys.executable, "-m", "distill", "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert (version.returncode, version.stdout) == (0, f"distill {distill.__version__}\n")
    missing = subprocess.run([sys.executable, "-m", "distill", "inspect", "missing"], capture_output=True, text=True,
                             cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("distill: error: ")
