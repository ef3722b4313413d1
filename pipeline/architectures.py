"""Built-in small architectures: the demo's teachers and students, and the tests' models.

Each is chosen by name with ``key=value`` options (``mlp:hidden=512,depth=3``). Every
module carries ``task`` and ``output_size`` attributes, and its random initial weights
depend only on its options: the same options, ``seed`` included, give bitwise the same
weights on the same torch version.

    mlp   classification on float features (B, F): Linear-ReLU blocks
    cnn   classification on float features (B, F): a 1-D convolution over the F values
    gpt   causal-lm on token ids (B, T): a nanoGPT-style pre-LN decoder
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError

__all__ = ["BUILTINS", "ARCHITECTURES", "Architecture", "resolve_options", "build_builtin", "uninitialised", "MLP", "CNN",
           "GPT", "document_mask"]


class MLP(nn.Module):
    """(B, F) float features -> (B, num_classes) logits, through ``depth`` hidden layers."""

    task = "classification"

    def __init__(self, in_features: int, num_classes: int, hidden: int, depth: int, dropout: float):
        super().__init__()
        self.output_size = num_classes
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.layers(inputs)


class CNN(nn.Module):
    """(B, F) float features -> (B, num_classes) logits.

    The F values are one channel of a 1-D signal: a strided convolution halves its length,
    ``depth - 1`` more keep it, and a linear layer reads the flattened feature map. Keeping
    positions (no global pooling) matters for mnist1d, whose digits sit at fixed offsets;
    this follows the small CNN for which the mnist1d paper reports about 94% test accuracy.
    """

    task = "classification"

    def __init__(self, in_features: int, num_classes: int, channels: int, depth: int):
        super().__init__()
        self.output_size = num_classes
        convs = [nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=2)]
        convs += [nn.Conv1d(channels, channels, kernel_size=3, padding=1) for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)
        length = (in_features + 1) // 2  # after the stride-2 convolution
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.unsqueeze(1)  # (B, 1, F)
        for conv in self.convs:
            x = F.relu(conv(x))  # (B, C, F/2)
        return self.head(x.flatten(1))  # (B, C * F/2) -> (B, num_classes)


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); ``attn_mask`` (B, 1, T, T) bool, True = may attend (None: causal)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                           is_causal=attn_mask is None)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.proj(y)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), attn_mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """(B, T) token ids -> (B, T, vocab_size) next-token logits; T <= max_len.

    Attention is causal, so with right padding the logits of real tokens do not depend on
    the padding after them. With ``position_ids`` (B, T) (packed documents) the position
    embedding reads them, and a token attends only within its document: documents start
    where position_ids == 0.
    """

    task = "causal-lm"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int,
                 dropout: float, tie_weights: bool):
        super().__init__()
        self.output_size, self.max_len = vocab_size, max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self._init_weights(n_layers)

    def _init_weights(self, n_layers: int) -> None:
        # GPT-2's init; the residual projections are scaled down so the residual stream's
        # variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        if T > self.max_len:
            raise ConfigError(f"gpt: sequence of {T} tokens is longer than max_len={self.max_len}; "
                              f"build it with max_len={T} or cut the data's sequences shorter")
        pos = torch.arange(T, device=input_ids.device) if position_ids is None else position_ids  # (T,) or (B, T)
        mask = None if position_ids is None else document_mask(position_ids)  # (B, 1, T, T)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x, mask)  # (B, T, C)
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids of packed documents -> (B, 1, T, T) bool, True where a token may attend:
    causally, within its document. A document starts where its position id is 0."""
    T = position_ids.shape[1]
    document = (position_ids == 0).cumsum(-1)  # (B, T) which document each token is in
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()  # (T, T)
    return ((document[:, :, None] == document[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A built-in: its constructor, every option with its default, and the task it does."""

    build: Callable[..., nn.Module]
    defaults: dict[str, Any]
    task: str
    check: Callable[[dict[str, Any]], str | None] = lambda options: None  # a problem, or None


def _check_gpt(o: dict[str, Any]) -> str | None:
    if o["d_model"] % o["n_heads"]:
        return f"d_model={o['d_model']} is not a multiple of n_heads={o['n_heads']}"
    return None


ARCHITECTURES: dict[str, Architecture] = {
    "mlp": Architecture(
        lambda seed, **o: MLP(**o),
        dict(in_features=40, num_classes=10, hidden=256, depth=2, dropout=0.0, seed=0),
        "classification"),
    "cnn": Architecture(
        lambda seed, **o: CNN(**o),
        dict(in_features=40, num_classes=10, channels=32, depth=3, seed=0),
        "classification"),
    "gpt": Architecture(
        lambda seed, **o: GPT(**o),
        dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, max_len=512, dropout=0.0, tie_weights=True, seed=0),
        "causal-lm", _check_gpt),
}
BUILTINS: tuple[str, ...] = tuple(ARCHITECTURES)

_MINIMUM = {"depth": 0, "seed": None}  # every other integer option must be at least 1


def _option(name: str, key: str, value: Any, default: Any) -> Any:
    """``value`` as the type of ``default``, or a ConfigError saying what is wrong."""
    bad = ConfigError(f"built-in {name!r}: option {key}={value!r} must be {type(default).__name__}, e.g. {key}={default}")
    if isinstance(default, bool):
        if value not in (True, False, 0, 1):
            raise bad
        return bool(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        low = _MINIMUM.get(key, 1)
        if low is not None and value < low:
            raise ConfigError(f"built-in {name!r}: option {key}={value} must be at least {low}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if key == "dropout" and not 0.0 <= value < 1.0:
            raise ConfigError(f"built-in {name!r}: option dropout={value} must be in [0, 1)")
        return float(value)
    return value


def resolve_options(name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every option of built-in ``name``: the given ones checked and typed, the rest defaults."""
    if name not in ARCHITECTURES:
        raise ConfigError(f"no built-in model {name!r}; choose one of {', '.join(BUILTINS)}")
    arch = ARCHITECTURES[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(arch.defaults))
    if unknown:
        raise ConfigError(f"built-in {name!r} has no option {', '.join(unknown)}; "
                          f"its options are {', '.join(f'{k}={v}' for k, v in arch.defaults.items())}")
    resolved = {k: _option(name, k, options.get(k, d), d) for k, d in arch.defaults.items()}
    problem = arch.check(resolved)
    if problem:
        raise ConfigError(f"built-in {name!r}: {problem}; change one of them")
    return resolved


def build_builtin(name: str, *, initialise: bool = True, **options: Any) -> nn.Module:
    """A freshly initialised built-in on the CPU in float32, its weights a function of the options.

    ``seed`` seeds a private random stream, so building a model neither depends on nor
    disturbs the caller's global RNG state. ``initialise=False`` leaves every parameter as
    ``torch.empty`` made it (no random draws: a 110M-parameter gpt builds in 0.03 s, not 1.2 s),
    for a caller that loads every weight next (``load_model`` with saved weights).
    """
    resolved = resolve_options(name, options)
    with torch.random.fork_rng(devices=[]), (contextlib.nullcontext() if initialise else uninitialised()):
        torch.manual_seed(resolved["seed"])
        return ARCHITECTURES[name].build(**resolved)


_INIT_LOCK = threading.Lock()  # one build at a time swaps torch.nn.init's functions


@contextlib.contextmanager
def uninitialised():
    """torch.nn.init's in-place initialisers do nothing in this thread while inside (as transformers' no_init_weights);
    other threads' calls meanwhile still initialise."""
    owner = threading.get_ident()

    def skipping(original):
        def init(tensor, *args, **kwargs):
            return tensor if threading.get_ident() == owner else original(tensor, *args, **kwargs)
        return init

    with _INIT_LOCK:
        originals = {name: getattr(nn.init, name) for name in dir(nn.init)
                     if name.endswith("_") and not name.startswith("_") and callable(getattr(nn.init, name))}
        try:
            for name, original in originals.items():
                setattr(nn.init, name, skipping(original))
            yield
        finally:
            for name, original in originals.items():
                setattr(nn.init, name, original)
