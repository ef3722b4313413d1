"""generate-labels and train-student on packed documents: the store's positions, and what it reports."""

import json

from click.testing import CliRunner

from datahelp import SENTENCES, make_hf_tokenizer, write_jsonl
from distill.cli import cli
from distill.pipeline.data import DataConfig, load_data
from distill.storage import open_store
from modelhelp import make_hf_causal_lm


def run(command, *args):
    """``distill COMMAND ARGS`` in this process, on the CPU."""
    result = CliRunner().invoke(cli, [command, *map(str, args)])
    assert result.exit_code == 0, f"exit {result.exit_code}: {result.output}\n{result.stderr}"
    return result


def test_generate_labels_with_pack_reports_the_documents(tmp_path):
    teacher = make_hf_causal_lm(tmp_path / "teacher", vocab=300)
    make_hf_tokenizer(teacher, eos_token="[EOS]")  # beside the weights: the teacher's own tokenizer
    texts = SENTENCES * 3
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in texts])
    out = tmp_path / "store"
    result = run("generate-labels", "--device", "cpu", "--teacher", teacher, "--data", data,  # the lines: no --no-progress
                 "--task", "causal-lm", "--out", out, "--k", 8, "--seq-len", 16, "--pack")
    examples = load_data(DataConfig(str(data), task="causal-lm", tokenizer=str(teacher), seq_len=16, pack=True))
    stats = examples.stats
    assert stats["documents"] == 12 and stats["dropped_tokens"] == 0 and stats["packed"]
    assert int(examples.lengths.sum()) == stats["tokens"] + 12  # and the 12 separators
    line = f"{stats['documents']:,} documents -> {stats['sequences']:,} sequences, {stats['tokens']:,} tokens (0 dropped)"
    assert line in result.stderr and "packed, attention per-document" in result.stderr

    reader = open_store(str(out))
    assert reader.spec.extra["data"] == {**stats, "attention": "per-document"}
    assert reader.num_positions == stats["positions"]
    assert reader.spec.dataset_fingerprint == examples.fingerprint()
    shown = run("inspect", out)
    assert line in shown.output and "packed, attention per-document" in shown.output
    assert json.loads(run("inspect", out, "--json").output)["data"]["documents"] == 12

    # the student trains on the same packed sequences (its position ids too)
    run("train-student", "--no-progress", "--device", "cpu", "--labels", out, "--data", data, "--task", "causal-lm",
        "--tokenizer", teacher, "--seq-len", 16, "--pack", "--student", "gpt:vocab_size=300,d_model=16,n_layers=1,"
        "n_heads=2,max_len=64", "--out", tmp_path / "student", "--steps", 2, "--batch-size", 4, "--workers", 0)
    summary = json.loads((tmp_path / "student" / "summary.json").read_text())
    assert summary["packed_attention"] == "per-document"

    # a student whose attention cannot stay within documents trains too, and is told so
    crossing = run("train-student", "--no-progress", "--device", "cpu", "--labels", out, "--data", data, "--task",
                   "causal-lm", "--tokenizer", teacher, "--seq-len", 16, "--pack", "--student",
                   "modelhelp:tiny_token_lm_300", "--out", tmp_path / "crossing", "--steps", 1, "--batch-size", 4,
                   "--workers", 0, "--alpha", 0)
    assert "the data is packed, but the student's attention crosses documents" in crossing.stderr
