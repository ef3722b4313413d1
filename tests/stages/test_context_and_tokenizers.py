"""--seq-len follows the models' context lengths, and run directories carry the tokenizer they were trained with."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from datahelp import make_hf_tokenizer
from modelhelp import make_hf_causal_lm

from distill.cli import cli
from distill.storage import open_store

TINY_GPT = "gpt:d_model=16,n_layers=1,n_heads=2"
TRAIN = ["--steps", 2, "--batch-size", 4, "--workers", 0]


def run(command, *args, ok=True):
    """``distill COMMAND ARGS`` in this process, on the CPU."""
    result = CliRunner().invoke(cli, [command, "--no-progress", "--device", "cpu", *map(str, args)])
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


def write_corpus(path: Path, words: int = 400) -> Path:
    g = torch.Generator().manual_seed(0)
    vocab = ["the", "teacher", "labels", "a", "small", "student", "offline", "😀", "\n"]
    path.write_text(" ".join(vocab[i] for i in torch.randint(len(vocab), (words,), generator=g).tolist()))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A GPT-2 of 300 ids and 64 positions, its tokenizer, a corpus, and a store the GPT-2 labelled at --seq-len 16."""
    root = tmp_path_factory.mktemp("context")
    model, tokenizer = make_hf_causal_lm(root / "gpt2", vocab=300), make_hf_tokenizer(root / "tok", vocab_size=300)
    corpus = write_corpus(root / "corpus.txt")
    run("generate-labels", "--teacher", model, "--data", corpus, "--tokenizer", tokenizer, "--seq-len", 16,
        "--out", root / "store", "--k", 4, "--tail-samples", 0)
    return root


def test_a_bytes_run_directory_is_a_teacher_without_tokenizer_and_its_student_generates(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    teacher = tmp_path / "teacher"
    run("train-teacher", "--model", f"{TINY_GPT},max_len=32", "--data", corpus, "--tokenizer", "bytes", "--out", teacher,
        *TRAIN)
    assert (teacher / "model" / "tokenizer.json").is_file() and (teacher / "model" / "model.json").is_file()
    assert json.loads((teacher / "config.json").read_text())["seq_len"] == 32  # gpt's max_len
    run("generate-labels", "--teacher", teacher, "--data", corpus, "--out", tmp_path / "store", "--k", 4,
        "--tail-samples", 0)  # no --tokenizer: the one in teacher/model
    extra = open_store(str(tmp_path / "store")).spec.extra
    assert extra["seq_len"] == 32 and extra["longest_sequence"] == 32
    student_config = make_hf_causal_lm(tmp_path / "student-config", vocab=256)  # 64 positions
    refused = run("train-student", "--labels", tmp_path / "store", "--data", corpus, "--student", student_config,
                  "--out", tmp_path / "s0", *TRAIN, ok=False)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert (f"none was found beside the student in {student_config} or {student_config}/model: "
            "pass --tokenizer DIR or bytes") in refused.stderr
    student = tmp_path / "student"
    run("train-student", "--labels", tmp_path / "store", "--data", corpus, "--student", student_config,
        "--tokenizer", "bytes", "--out", student, *TRAIN)  # --seq-len 32 from the store, or the data would differ
    assert json.loads((student / "config.json").read_text())["seq_len"] == 32
    tokens = generate(student / "model", "the 😀")
    assert tokens["prompt"] == list("the 😀".encode()) and tokens["new"] == 4
    # evaluate against the store: the tokenizer from student/model, --seq-len 32 from the store
    result = CliRunner().invoke(cli, ["evaluate", "--device", "cpu", "--model", str(student), "--data", str(corpus),
                                       "--split", "train", "--labels", str(tmp_path / "store"), "--repeats", "1",
                                       "--warmup", "0", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.output)
    assert report["positions"] > 0 and report["agreement"] is not None


def test_an_hf_run_directory_saves_its_tokenizer_and_generates(hf, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "teacher"
    run("train-teacher", "--model", hf / "gpt2", "--data", hf / "corpus.txt", "--tokenizer", hf / "tok", "--out", out,
        *TRAIN)
    assert json.loads((out / "config.json").read_text())["seq_len"] == 64  # the GPT-2's n_positions
    text = "the teacher labels a small student"
    source = AutoTokenizer.from_pretrained(str(hf / "tok"))(text)["input_ids"]
    assert generate(out / "model", text) == {"prompt": source, "new": 4}
    run("generate-labels", "--teacher", out, "--data", hf / "corpus.txt", "--out", tmp_path / "store", "--k", 4,
        "--tail-samples", 0)  # no --tokenizer: the one saved in out/model
    assert open_store(str(tmp_path / "store")).spec.extra["seq_len"] == 64


def generate(model_dir: Path, prompt: str) -> dict:
    """Load ``model_dir`` with AutoTokenizer and AutoModelForCausalLM and greedily generate 4 tokens after ``prompt``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, pad_token_id=0)
    assert out.shape == (1, ids.shape[1] + 4) and bool((out[:, : ids.shape[1]] == ids).all())
    return {"prompt": ids[0].tolist(), "new": out.shape[1] - ids.shape[1]}


MESSAGE = "--seq-len 65 is longer than the {}'s context length (64 tokens): pass --seq-len 64 or less"


@pytest.mark.parametrize("command, args, who", [
    ("generate-labels", ["--teacher", "{gpt2}", "--k", 4], "teacher"),
    ("train-teacher", ["--model", "{gpt2}", *TRAIN], "model"),
    ("train-student", ["--student", "{gpt2}", "--labels", "{store}", *TRAIN], "student"),
])
def test_a_seq_len_longer_than_the_context_is_refused_before_anything_is_written(hf, tmp_path, command, args, who):
    args = [str(a).format(gpt2=hf / "gpt2", store=hf / "store") for a in args]
    out = tmp_path / "out"
    refused = run(command, *args, "--data", hf / "corpus.txt", "--tokenizer", hf / "tok", "--seq-len", 65, "--out", out,
                  ok=False)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert MESSAGE.format(who) in refused.stderr
    assert not out.exists()


def test_a_student_shorter_than_the_stores_sequences_is_refused(hf, tmp_path):
    corpus, tok = hf / "corpus.txt", hf / "tok"
    run("generate-labels", "--teacher", f"{TINY_GPT},vocab_size=300,max_len=128", "--data", corpus, "--tokenizer", tok,
        "--out", tmp_path / "store", "--k", 4, "--tail-samples", 0)  # --seq-len 128: the teacher's max_len
    refused = run("train-student", "--labels", tmp_path / "store", "--student", hf / "gpt2", "--data", corpus,
                  "--tokenizer", tok, "--out", tmp_path / "s", *TRAIN, ok=False)
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert ("holds sequences of up to 128 tokens (made with --seq-len 128) but the student's context length is 64 "
            "tokens: regenerate the labels with --seq-len 64") in refused.stderr
    assert not (tmp_path / "s").exists()
