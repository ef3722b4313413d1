"""Provenance in the store, the teacher-licence check, and lineage in `distill inspect` (issue 19)."""

import json
import struct

import pytest
from click.testing import CliRunner
from clihelp import run
from datahelp import write_jsonl
from modelhelp import make_hf_causal_lm

from distill.cli import cli
from distill.errors import ConfigError
from distill.pipeline.provenance import check_teacher_license, dataset_identity, read_license, teacher_identity

MNIST = "mnist1d:num_samples=64"


def inspect(*args):
    result = CliRunner().invoke(cli, ["inspect", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout


def _teacher(tmp_path, card=None, config_license=None):
    """A tiny GPT-2 teacher; ``card`` is README.md's YAML metadata, ``config_license`` config.json's "license"."""
    teacher = make_hf_causal_lm(tmp_path / "teacher", vocab=64)
    if card is not None:
        (teacher / "README.md").write_text(f"---\n{card}---\n# a tiny teacher\n")
    if config_license is not None:
        config = json.loads((teacher / "config.json").read_text())
        (teacher / "config.json").write_text(json.dumps({**config, "license": config_license}))
    return teacher


def _ids(tmp_path):
    return write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [1, 2, 3, 4, 5, 6]}, {"input_ids": [7, 8, 9, 10]}])


def _manifest(store):
    return json.loads((store / "manifest.json").read_text())


def test_a_restricted_licence_is_refused_then_acknowledged_and_shown(tmp_path):
    teacher, data, out = _teacher(tmp_path, card="license: llama2\n"), _ids(tmp_path), tmp_path / "store"
    args = ["--teacher", teacher, "--data", data, "--out", out, "--seq-len", 8]
    refused = run("generate-labels", *args, ok=False)
    assert refused.exit_code == 2 and not out.exists()
    line = refused.stderr.strip()
    assert "\n" not in line and "'llama2'" in line and "--accept-teacher-license llama2" in line, line

    run("generate-labels", *args, "--accept-teacher-license", "llama2")
    manifest = _manifest(out)
    provenance = manifest["extra"]["provenance"]
    assert provenance["license_acknowledged"] == "llama2"
    t = provenance["teacher"]
    assert (t["license"], t["license_source"], t["architecture"]) == ("llama2", "README.md", "GPT2LMHeadModel")
    assert t["weights_fingerprint"] == manifest["teacher_fingerprint"] and t["spec"] == str(teacher)
    from transformers import AutoModelForCausalLM
    assert t["parameters"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(teacher).parameters())
    d = provenance["dataset"]
    assert d == {"spec": str(data), "split": "train", "examples": 2, "fingerprint": manifest["dataset_fingerprint"],
                 "license": None}
    assert provenance["config"]["accept_teacher_license"] == "llama2" and provenance["tool_version"]
    assert provenance["created"].endswith("+00:00") and isinstance(provenance["command"], str)

    rerun = run("generate-labels", *args, "--accept-teacher-license", "llama2")  # resumes: provenance is not compared
    assert rerun.exit_code == 0

    summary = json.loads(inspect(out, "--json").strip().splitlines()[-1])
    assert summary["provenance"]["teacher"]["license"] == "llama2"
    assert [link["link"] for link in summary["lineage"]] == ["store", "teacher"]
    assert summary["lineage"][1]["fingerprint"] == manifest["teacher_fingerprint"]
    text = inspect(out)
    for part in ("provenance", "teacher licence       llama2 (from README.md)", "licence acknowledged  llama2",
                 "lineage", "<- teacher", manifest["teacher_fingerprint"], manifest["dataset_fingerprint"]):
        assert part in text, part


def test_a_licence_in_config_json_is_refused_and_a_wrong_acknowledgement_does_not_count(tmp_path):
    teacher, data, out = _teacher(tmp_path, config_license="llama3"), _ids(tmp_path), tmp_path / "store"
    for extra in ([], ["--accept-teacher-license", "llama2"]):
        result = run("generate-labels", "--teacher", teacher, "--data", data, "--out", out, *extra, ok=False)
        assert result.exit_code == 2 and "--accept-teacher-license llama3" in result.stderr and not out.exists()


def test_require_known_license_refuses_a_teacher_without_one(tmp_path):
    teacher, data, out = _teacher(tmp_path), _ids(tmp_path), tmp_path / "store"
    result = run("generate-labels", "--teacher", teacher, "--data", data, "--out", out, "--require-known-license",
                 ok=False)
    line = result.stderr.strip()
    assert result.exit_code == 2 and "\n" not in line and "--accept-teacher-license unknown" in line and not out.exists()
    identity = teacher_identity(str(teacher))
    check_teacher_license(identity, "unknown", require_known=True)  # acknowledged: goes on
    check_teacher_license(identity, None, require_known=False)  # not asked for: goes on


@pytest.mark.parametrize("card, expected", [
    ("license: other\nlicense_name: llama4\n", "llama4"),
    ("license: Gemma\n", "gemma"),
    ("license: apache-2.0\n", "apache-2.0"),
    ("language: en\n", None),
    ("license: unknown\n", None),  # what a student's card says when its teacher declared none
])
def test_read_license_from_card_metadata(tmp_path, card, expected):
    (tmp_path / "README.md").write_text(f"---\n{card}---\ntext\n")
    assert read_license(str(tmp_path))[0] == expected
    if expected in ("llama4", "gemma"):
        with pytest.raises(ConfigError, match=f"--accept-teacher-license {expected}"):
            check_teacher_license({"spec": "t", "license": expected, "license_source": "README.md"}, None, False)
    else:
        check_teacher_license({"spec": "t", "license": expected}, None, False)


def test_a_saved_datasets_dataset_declares_its_licence(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    table = datasets.Dataset.from_dict({"text": ["a", "b"]}, info=datasets.DatasetInfo(license="cc-by-4.0"))
    table.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "splits"))
    for name in ("one", "splits"):
        assert dataset_identity(str(tmp_path / name), "train", 2, "sha256:x")["license"] == "cc-by-4.0"


def test_revision_and_parameters_come_from_the_files(tmp_path):
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    header = json.dumps({"__metadata__": {}, "a": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
                         "b": {"dtype": "F32", "shape": [5], "data_offsets": [48, 68]}}).encode()
    (snapshot / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(68))
    (snapshot / "config.json").write_text(json.dumps({"_name_or_path": "org/tiny", "architectures": ["TinyLM"]}))
    identity = teacher_identity(str(snapshot))
    assert (identity["revision"], identity["parameters"], identity["name_or_path"]) == ("0123abcd", 17, "org/tiny")
    (snapshot / "config.json").write_text(json.dumps({"_commit_hash": "feedbeef"}))
    assert teacher_identity(str(snapshot))["revision"] == "feedbeef"


def test_inspect_a_student_run_shows_the_chain_to_the_teachers_run(tmp_path):
    common = ["--data", MNIST, "--workers", 0, "--batch-size", 16]
    run("train-teacher", "--model", "mlp:hidden=8", "--steps", 1, "--out", tmp_path / "teacher", *common)
    run("generate-labels", "--teacher", tmp_path / "teacher", "--data", MNIST, "--out", tmp_path / "labels", "--k", 3)
    run("train-student", "--labels", tmp_path / "labels", "--student", "mlp:hidden=4", "--steps", 1, "--out",
        tmp_path / "student", *common)
    manifest = _manifest(tmp_path / "labels")
    summary = json.loads(inspect(tmp_path / "student", "--json").strip().splitlines()[-1])
    chain = summary["lineage"]
    assert [link["link"] for link in chain] == ["student", "store", "teacher", "teacher run"]
    assert chain[0]["weights_sha256"].startswith("sha256:")
    assert chain[1]["teacher_fingerprint"] == manifest["teacher_fingerprint"] == chain[2]["fingerprint"]
    assert chain[1]["dataset_fingerprint"] == manifest["dataset_fingerprint"]
    assert chain[2]["recorded_fingerprint_matches"] and chain[3]["path"] == str(tmp_path / "teacher")
    card = tmp_path / "student" / "model" / "README.md"  # the card train-student writes, or one that claims another store
    card.write_text(f"teacher `{manifest['teacher_fingerprint']}`, data `{manifest['dataset_fingerprint']}`\n")
    assert json.loads(inspect(tmp_path / "student", "--json"))["lineage"][0]["card_names_store_fingerprints"] is True
    card.write_text("teacher `sha256:0123`\n")
    assert json.loads(inspect(tmp_path / "student", "--json"))["lineage"][0]["card_names_store_fingerprints"] is False
    text = inspect(tmp_path / "student")
    assert "its card names the store's fingerprints: NO" in text
    for part in ("lineage", "   student", "<- store", "<- teacher", "<- teacher run", manifest["teacher_fingerprint"]):
        assert part in text, part
