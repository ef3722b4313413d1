"""Context lengths and --seq-len resolution; tokenizers saved beside models (the bytes tokenizer as Hugging Face's)."""

import random
import warnings

import pytest

from datahelp import make_hf_tokenizer
from modelhelp import make_hf_causal_lm

from distill.errors import ConfigError
from distill.pipeline.context import DEFAULT_SEQ_LEN, MAX_DEFAULT_SEQ_LEN, resolve_seq_len, stored_seq_len
from distill.pipeline.models import ModelConfig, load_model
from distill.pipeline.tokenfiles import byte_level_tokenizer, looked_for_tokenizer, save_tokenizer
from distill.pipeline.tokenize import ByteTokenizer, load_tokenizer, require_tokenizer, tokenizer_beside

TINY_GPT = "gpt:d_model=16,n_layers=1,n_heads=2"


def test_context_length_of_each_kind(tmp_path):
    hf = load_model(ModelConfig(str(make_hf_causal_lm(tmp_path / "hf"))))  # n_positions=64
    assert hf.context_length == 64
    assert load_model(ModelConfig(f"{TINY_GPT},max_len=40")).context_length == 40
    assert load_model(ModelConfig("mlp:hidden=8")).context_length is None


FACTORY = """
from torch import nn

class TinyLM(nn.Module):
    task = "causal-lm"

    def __init__(self):
        super().__init__()
        self.max_seq_len = 24
        self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 10)

    def forward(self, x):
        return self.out(self.emb(x))

def make():
    return TinyLM()
"""


def test_context_length_of_a_factory_and_a_torchscript_model(tmp_path, monkeypatch):
    import torch

    (tmp_path / "ctxfactory.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_model(ModelConfig("ctxfactory:make")).context_length == 24
    import ctxfactory

    with warnings.catch_warnings():  # torch marks TorchScript deprecated; users still bring it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(ctxfactory.make()), str(tmp_path / "lm.pt"))
    assert load_model(ModelConfig(str(tmp_path / "lm.pt"), task="causal-lm")).context_length == 24


def test_seq_len_defaults_to_the_context_capped(tmp_path):
    hf = load_model(ModelConfig(str(make_hf_causal_lm(tmp_path / "hf"))))
    assert resolve_seq_len(None, teacher=hf) == 64
    assert resolve_seq_len(None, model=load_model(ModelConfig(f"{TINY_GPT},max_len=40"))) == 40
    long = load_model(ModelConfig(f"{TINY_GPT},max_len=4096"))
    assert resolve_seq_len(None, student=long) == MAX_DEFAULT_SEQ_LEN == 2048
    assert resolve_seq_len(None, model=load_model(ModelConfig("mlp:hidden=8"))) == DEFAULT_SEQ_LEN == 256
    assert resolve_seq_len(None, model=long, teacher=hf) == 64  # the shortest context of the models reading the data
    assert resolve_seq_len(32, teacher=hf) == 32 and resolve_seq_len(64, teacher=hf) == 64


def test_a_longer_seq_len_is_refused_in_one_line(tmp_path):
    hf = load_model(ModelConfig(str(make_hf_causal_lm(tmp_path / "hf"))))
    with pytest.raises(ConfigError) as e:
        resolve_seq_len(65, teacher=hf)
    assert str(e.value) == "--seq-len 65 is longer than the teacher's context length (64 tokens): pass --seq-len 64 or less"


def test_a_student_takes_the_stores_seq_len_and_must_hold_its_longest_sequence(tmp_path):
    hf = load_model(ModelConfig(str(make_hf_causal_lm(tmp_path / "hf"))))
    assert stored_seq_len(None, {"seq_len": 48, "longest_sequence": 48}, "s", hf) == 48
    assert stored_seq_len(None, {"seq_len": 512, "longest_sequence": 30}, "s", hf) == 512  # ids data: nothing cut
    assert stored_seq_len(None, {}, "s", hf) == DEFAULT_SEQ_LEN  # a store from before seq_len was recorded
    with pytest.raises(ConfigError, match=r"sequences of up to 128 tokens \(made with --seq-len 128\) but the "
                                          r"student's context length is 64 tokens: regenerate the labels with --seq-len 64"):
        stored_seq_len(None, {"seq_len": 128, "longest_sequence": 128}, "s", hf)
    with pytest.raises(ConfigError, match="--seq-len 100 is longer than the student's context length"):
        stored_seq_len(100, {"seq_len": 48, "longest_sequence": 48}, "s", hf)


def random_text(rng: random.Random, n: int) -> str:
    """ASCII, Latin-1, CJK, emoji, control characters and newlines."""
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0x80, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF)]
    return "".join("\n" if rng.random() < 0.05 else chr(rng.randint(*rng.choice(ranges))) for _ in range(n))


def test_the_saved_bytes_tokenizer_is_the_byte_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    assert save_tokenizer("bytes", str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    loaded = load_tokenizer(str(tmp_path))  # as the stages read it
    assert len(hf) == loaded.vocab_size == ByteTokenizer.vocab_size == 256
    rng = random.Random(0)
    texts = [random_text(rng, rng.randint(0, 80)) for _ in range(200)] + ["", "\n\n", "héllo wörld 😀👍🏽\r\n", " a  b "]
    for text in texts:
        expected = ByteTokenizer().encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == expected == loaded.encode(text)
        assert hf.decode(expected) == text
    assert loaded.encode_batch(texts[:5]) == ByteTokenizer().encode_batch(texts[:5])
    assert byte_level_tokenizer().convert_ids_to_tokens(list(range(256))) == hf.convert_ids_to_tokens(list(range(256)))


def test_an_hf_tokenizer_is_saved_as_it_encodes(tmp_path):
    source = make_hf_tokenizer(tmp_path / "tok")
    assert save_tokenizer(str(source), str(tmp_path / "model"))
    assert not save_tokenizer(None, str(tmp_path / "none"))
    text = "the student learns from the teacher"
    assert load_tokenizer(str(tmp_path / "model")).encode(text) == load_tokenizer(str(source)).encode(text)


def test_a_tokenizer_is_found_in_a_run_directorys_model(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    assert tokenizer_beside(str(run)) is None
    save_tokenizer("bytes", str(run / "model"))
    assert tokenizer_beside(str(run)) == str(run / "model")
    assert tokenizer_beside(str(run / "model")) == str(run / "model")
    assert tokenizer_beside("gpt") is None


def test_no_tokenizer_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError) as e, looked_for_tokenizer(teacher=str(tmp_path)):
        require_tokenizer(None, "text data 'c.txt'")
    assert str(e.value) == (f"text data 'c.txt' must be tokenised, but no --tokenizer was given and none was found "
                            f"beside the teacher in {tmp_path} or {tmp_path}/model: pass --tokenizer DIR or bytes")
    with pytest.raises(ConfigError, match=r"beside the teacher 'gpt' \(not a directory\): pass --tokenizer DIR or bytes"), \
            looked_for_tokenizer(teacher="gpt"):
        require_tokenizer(None, "text data 'c.txt'")
