"""Builders of small data sets and tokenizers, offline, for tests that need data."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

MNIST1D_SMALL = "mnist1d:num_samples=200"  # 160 train / 40 test examples, generated in ~0.1 s

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran after the cat",
    "hello world, hello teacher",
    "the student learns from the teacher",
]


def make_hf_tokenizer(directory: str | Path, vocab_size: int = 300, eos_token: str | None = None) -> Path:
    """Train a tiny byte-level BPE on SENTENCES and save it as a Hugging Face tokenizer.

    Its post-processor prepends [BOS] when special tokens are added, so tests can tell
    whether they were. ``eos_token`` (e.g. "[EOS]") adds that special token as the
    end-of-text token (none by default). Returns the directory, loadable with
    AutoTokenizer.from_pretrained.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = ["[PAD]", "[UNK]", "[BOS]"] + ([eos_token] if eos_token else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    bos = tok.token_to_id("[BOS]")
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   **({"eos_token": eos_token} if eos_token else {}))
    directory = Path(directory)
    fast.save_pretrained(str(directory))
    return directory


def write_parquet(path: str | Path, columns: dict) -> Path:
    """A parquet file from a dict of python lists."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def save_hf_dataset(path: str | Path, columns: dict | None = None, splits: dict[str, dict] | None = None) -> Path:
    """``datasets.Dataset.from_dict(columns).save_to_disk(path)``, or a DatasetDict of ``splits``."""
    import datasets

    datasets.disable_progress_bars()
    if splits is not None:
        data = datasets.DatasetDict({name: datasets.Dataset.from_dict(c) for name, c in splits.items()})
    else:
        data = datasets.Dataset.from_dict(columns)
    data.save_to_disk(str(path))
    return Path(path)


def write_module(directory: str | Path, name: str, source: str, monkeypatch) -> str:
    """Write ``{name}.py`` into ``directory``, put that on sys.path; returns the module name."""
    Path(directory, f"{name}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    monkeypatch.syspath_prepend(str(directory))
    return name


CHATML_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_chat_tokenizer(directory: str | Path, template: str | None = CHATML_TEMPLATE) -> Path:
    """``make_hf_tokenizer`` plus the ChatML turn markers <|im_start|> and <|im_end|> as special
    tokens, and ``template`` (ChatML by default; None for none) as its chat template."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    directory = make_hf_tokenizer(directory)
    tok = AutoTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.backend_tokenizer.decoder = decoders.ByteLevel()  # so that decode() gives the text back
    tok.chat_template = template
    tok.save_pretrained(str(directory))
    return directory
