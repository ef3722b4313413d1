"""Untrusted files: weights, Hugging Face directories and stores run no code the user did not ask for."""

import json
import re
from pathlib import Path

import pytest

from distill.errors import CorruptStoreError
from distill.storage import open_store
from distill.storage.manifest import dumps_checked
from distill.storage.layout import commit_path

from killhelp import DATA, GENERATE, one_line_error, run
from modelhelp import make_hf_remote_code_dir, make_malicious_pickle
from storehelp import make_labels, write_store

PACKAGE = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    out = tmp_path_factory.mktemp("labels") / "store"
    run(*GENERATE, "--out", out)
    return out


@pytest.mark.parametrize("command", ["generate-labels", "train-student"])
def test_weights_holding_a_pickle_with_code_are_refused_without_running_it(command, labels, tmp_path):
    marker = tmp_path / "pwned"
    evil = make_malicious_pickle(tmp_path / "weights.pt", marker)
    if command == "generate-labels":
        argv = ["generate-labels", "--teacher", "slowteacher:fast_factory", "--data", DATA, "--out", tmp_path / "s"]
    else:
        argv = ["train-student", "--labels", labels, "--student", "faultdata:student", "--data", DATA, "--steps", 1,
                "--workers", 0, "--out", tmp_path / "run"]
    result = run(*argv, "--weights", evil, "--no-progress", ok=False)
    one_line_error(result, "refuses to unpickle code", "opt in yourself", "weights_only=False")
    assert not marker.exists(), "the pickle's code ran"


def test_hugging_face_remote_code_is_off_unless_the_flag_is_given(tmp_path):
    marker = tmp_path / "remote-code-ran"
    remote = make_hf_remote_code_dir(tmp_path / "remote", marker)
    result = run("generate-labels", "--teacher", remote, "--data", DATA, "--out", tmp_path / "s", "--no-progress", ok=False)
    one_line_error(result, "needs Python code shipped inside it", "pass --trust-remote-code")
    assert not marker.exists()
    flag = run("generate-labels", "--teacher", remote, "--data", DATA, "--out", tmp_path / "s", "--no-progress",
               "--trust-remote-code", ok=False)
    assert marker.exists(), "with the flag, the directory's code is what the user asked to run"
    assert flag.exit_code != 0  # (the stand-in code defines no model)


@pytest.mark.parametrize("name", ["../../../outside", "/etc/passwd", "a/../../b", "c:\\\\x", "./zarr.json", ""])
@pytest.mark.parametrize("sealed", [False, True])
def test_shard_paths_outside_the_store_are_refused(name, sealed, tmp_path):
    url = tmp_path / "s"
    write_store(url, make_labels("topk", n_examples=4), per_shard=4, finalize=False)
    doc = json.loads((url / commit_path(0)).read_text())
    doc["files"][name] = {"bytes": 1, "crc32": "00000000"}
    if sealed:
        manifest = json.loads((url / "manifest.json").read_text())
        manifest["finalized"] = True
        manifest["shards"] = [{k: v for k, v in doc.items() if k != "crc32"}]
        (url / "manifest.json").write_bytes(dumps_checked(manifest))
    else:
        (url / commit_path(0)).write_bytes(dumps_checked(doc))
    with pytest.raises(CorruptStoreError, match="points outside the store"):
        open_store(str(url)).read_shard(0)


def test_the_store_never_unpickles_or_evaluates_anything():
    """No code path of the store can run stored bytes: no pickle, eval, exec or torch.load in storage/."""
    banned = re.compile(r"\b(pickle|eval|exec|torch\.load|marshal|shelve|allow_pickle\s*=\s*True|__import__|importlib)\b")
    hits = [f"{p.name}:{n}: {line.strip()}" for p in sorted((PACKAGE / "storage").glob("*.py"))
            for n, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
    assert hits == []


def test_the_docs_say_that_module_specs_run_the_users_code():
    text = (PACKAGE / "docs" / "RELIABILITY.md").read_text()
    assert "`package.module:function`" in text and "runs the user's code" in text
