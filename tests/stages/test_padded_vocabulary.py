"""A student whose vocabulary is padded past the teacher's trains, its extra logits out of both terms; a smaller one is refused."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.pipeline.models import ModelConfig, load_model
from clihelp import run

TEACHER = "gpt:d_model=32,n_layers=1,n_heads=2,max_len=32"



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded")
    g = torch.Generator().manual_seed(1)
    (root / "corpus.txt").write_text("".join(chr(97 + i) for i in torch.randint(12, (700,), generator=g).tolist()))
    common = ["--data", root / "corpus.txt", "--tokenizer", "bytes", "--seq-len", 32]
    run("generate-labels", "--teacher", TEACHER, *common, "--out", root / "labels", "--k", 8)
    return root, common


def test_the_extra_logits_are_cut_before_every_softmax():
    model = load_model(ModelConfig("gpt:vocab_size=300,d_model=16,n_layers=1,n_heads=2,max_len=16"))
    ids = torch.randint(256, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full = model.logits(batch)
    model.use_vocabulary(256)
    cut = model.logits(batch)
    assert full.shape[-1] == 300 and cut.shape[-1] == 256
    torch.testing.assert_close(cut, full[..., :256], rtol=0, atol=0)
    model.use_vocabulary(300)  # the whole vocabulary again
    assert model.logits(batch).shape[-1] == 300


def test_a_padded_student_trains_and_its_extra_rows_get_no_gradient(store, tmp_path):
    root, common = store
    student = "gpt:vocab_size=320,d_model=16,n_layers=1,n_heads=2,max_len=32,tie_weights=false"
    out = tmp_path / "student"
    run("train-student", "--labels", root / "labels", "--student", student, *common, "--out", out, "--steps", 6,
        "--batch-size", 4, "--workers", 0, "--weight-decay", 0, "--alpha", 0.5, "--eval-split", "train")
    before = load_model(ModelConfig(student)).module.state_dict()
    after = load_file(Path(out) / "model" / "model.safetensors")
    head = "lm_head.weight"
    assert not torch.equal(after[head][:256], before[head][:256])  # the teacher's ids are learned
    torch.testing.assert_close(after[head][256:], before[head][256:], rtol=0, atol=0)  # the padding never is
    # evaluate against the store scores it over the teacher's 256 ids too
    result = run("evaluate", "--model", out, *common, "--split", "train", "--labels", root / "labels", "--json")
    assert '"agreement"' in result.output


def test_a_student_smaller_than_the_teachers_vocabulary_is_refused(store, tmp_path):
    root, common = store
    result = run("train-student", "--labels", root / "labels", "--student",
                 "gpt:vocab_size=200,d_model=16,n_layers=1,n_heads=2,max_len=32", *common, "--out", tmp_path / "s",
                 "--steps", 2, ok=False)
    assert result.exit_code == 2
    assert "outputs 200 values but the teacher's vocabulary is 256" in result.output
    assert "at least 256 outputs" in result.output and not (tmp_path / "s" / "model").exists()


def test_a_padded_hugging_face_student_never_generates_its_padding(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datahelp import SENTENCES, make_hf_tokenizer, write_jsonl
    from modelhelp import make_hf_causal_lm

    teacher = make_hf_causal_lm(tmp_path / "teacher", vocab=300)
    make_hf_tokenizer(teacher)
    student = make_hf_causal_lm(tmp_path / "student", vocab=320)  # 300 ids padded to 320
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    common = ["--data", data, "--task", "causal-lm", "--tokenizer", teacher]
    run("generate-labels", "--teacher", teacher, *common, "--out", tmp_path / "labels", "--k", 4)
    run("train-student", "--labels", tmp_path / "labels", "--student", student, *common, "--out", tmp_path / "run",
        "--steps", 1, "--batch-size", 4, "--workers", 0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.generation_config.suppress_tokens == list(range(300, 320))
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + (torch.arange(320) >= 300) * 1e4)
    prompt = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")("offline", return_tensors="pt")
    n = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape[1] > n and int(out[0, n:].max()) < 300  # the padding's logits are the largest, and never win
    model.generation_config.suppress_tokens = None
    assert int(model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)[0, n:].min()) >= 300
