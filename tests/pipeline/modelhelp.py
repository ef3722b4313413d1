"""Tiny models for tests, built offline: Hugging Face directories, factories, TorchScript, pickles.

The factories here are importable as ``modelhelp:<name>`` model specs, since pytest puts
this folder on sys.path.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn


def make_hf_causal_lm(directory, vocab: int = 300, n_layer: int = 1, n_embd: int = 32, seed: int = 0) -> Path:
    """A random GPT-2 causal LM saved with save_pretrained in ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=64)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(directory)
    return Path(directory)


def make_hf_classifier(directory, vocab: int = 300, num_labels: int = 3, pad_token_id: int = 299, seed: int = 0) -> Path:
    """A random GPT-2 sequence classifier (pools the last non-pad token) saved in ``directory``.

    ``pad_token_id`` is deliberately not 0, the data's pad id, so tests see that the
    model's own pad id decides which token it pools.
    """
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(vocab_size=vocab, n_layer=1, n_embd=32, n_head=2, n_positions=64,
                        num_labels=num_labels, pad_token_id=pad_token_id)
    torch.manual_seed(seed)
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    return Path(directory)


def make_hf_remote_code_dir(directory, marker) -> Path:
    """A Hugging Face directory whose config needs its own Python code; importing that code creates ``marker``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "distill-test-remote", "architectures": ["RemoteForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig",
                           "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM"}}
    (directory / "config.json").write_text(json.dumps(config))
    payload = f"open({str(marker)!r}, 'w').write('remote code ran')\n"
    (directory / "configuration_remote.py").write_text(payload)
    (directory / "modeling_remote.py").write_text(payload)
    return directory


class _Evil:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def make_malicious_pickle(path, marker) -> Path:
    """A torch.save file of tensors plus an object whose unpickling would create ``marker``."""
    torch.save({"layers.0.weight": torch.zeros(2, 2), "payload": _Evil(marker)}, path)
    return Path(path)


class TinyFeatureNet(nn.Module):
    """(B, 8) -> (B, 5); declares no task and no output size (the last Linear gives 5)."""

    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 5)

    def forward(self, inputs):
        return self.out(torch.relu(self.hidden(inputs)))


class TinyTokenLM(nn.Module):
    """(B, L) token ids -> an HF-style output whose .logits is (B, L, 50)."""

    task = "causal-lm"
    vocab_size = 50

    def __init__(self, vocab: int = 50):
        super().__init__()
        self.vocab_size = vocab
        self.emb = nn.Embedding(vocab, 12)
        self.head = nn.Linear(12, vocab)

    def forward(self, input_ids):
        class Output:
            pass

        out = Output()
        out.logits = self.head(self.emb(input_ids))
        return out


def tiny_feature_net() -> nn.Module:
    torch.manual_seed(0)
    return TinyFeatureNet()


def tiny_feature_classifier() -> nn.Module:
    module = tiny_feature_net()
    module.task = "classification"
    return module


def tiny_token_lm() -> nn.Module:
    torch.manual_seed(0)
    return TinyTokenLM()


def tiny_token_lm_300() -> nn.Module:
    """TinyTokenLM over 300 ids (tests/pipeline/datahelp.make_hf_tokenizer's vocabulary): no attention at all."""
    torch.manual_seed(0)
    return TinyTokenLM(300)


def needs_an_argument(width) -> nn.Module:
    return nn.Linear(width, width)


def not_a_module():
    return "a string"


def make_torchscript(path, trace: bool = False) -> Path:
    """A tiny (B, 8) -> (B, 5) classifier saved with torch.jit.save, scripted (keeps
    ``output_size``) or traced (keeps no attributes)."""
    module = tiny_feature_classifier()
    module.output_size = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.trace(module, torch.randn(2, 8)) if trace else torch.jit.script(module)
        torch.jit.save(scripted, str(path))
    return Path(path)


def token_batch(vocab: int, lengths: list[int], seed: int = 0) -> dict:
    """Right-padded token ids with pad id 0 and their attention mask, as the data module gives."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "position_mask": mask.bool()}
