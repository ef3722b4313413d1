"""`distill quantize`: distil, then quantise. A trained model in, an int8 model out that evaluate accepts.

Reads top to bottom: load the model, refuse what cannot be quantized, replace its Linear
layers by int8 ones, export the result as a TorchScript archive, and write the output
run directory:

    OUT/model/model.pt      the quantized model (torch.jit.save): loads back with
                            torch.jit.load, which runs no pickled Python code
    OUT/model/model.json    {"kind": "torchscript", "file": "model.pt", "method", "source", "traced_on", ...}:
                            makes OUT itself a model spec, like a training run directory
    OUT/model/README.md     the source's model card carried over, saying how it was quantised
    OUT/summary.json        what this returns: bytes before and after, Linear layers quantized

Every ``nn.Linear`` is quantized, and so is transformers' ``Conv1D`` (GPT-2's Linear with a
transposed weight), rewritten as the Linear it computes. Embeddings, convolutions and norms
stay in float; a Linear whose weight is tied to an embedding gets its own int8 copy.

Methods:

    dynamic-int8       for the CPU: ``torch.ao.quantization.quantize_dynamic`` on every
                       ``nn.Linear`` (int8 weights, activations quantized on the fly by
                       fbgemm/qnnpack kernels, which run on the CPU only). torch marks
                       torch.ao.quantization deprecated in favour of the separate torchao
                       package, but ships no replacement in torch itself; this is the one
                       int8 matmul path in torch that is faster than float on a CPU. Its
                       archive holds fbgemm's packed weights, and torch warns on loading one
                       that quantized tensors are deprecated: a torch that drops them will not
                       load it (re-quantize then). A torch without quantize_dynamic gets a
                       one-line error naming weight-only-int8.
    weight-only-int8   for a GPU (runs anywhere): int8 weights with one float scale per output
                       channel (symmetric, max-abs / 127), dequantised at matmul time. It
                       quarters the Linear weights' bytes on disk and in memory; it does not
                       make the matmul itself faster (the float weight is rebuilt per call).
                       Its archive holds plain int8 and float tensors.

The archive is ``torch.jit.script`` of the quantized module when the module scripts (the
built-ins do; the code then runs on any device and any shape), else ``torch.jit.trace`` on
examples of the data, checked against the quantized module on other examples (another
batch size and, for token ids, another length), and refused if it differs. A thin scripted
wrapper keeps ``task``, ``output_size`` and ``num_parameters`` as attributes (a quantized
Linear is no ``nn.Linear`` and holds no parameters) and the source's fingerprint as a buffer
(packed int8 weights are not in a TorchScript state dict, so the model fingerprint would miss them).

Devices: a trace fixes the device it ran on into the archive's code (``torch.arange(...,
device="cpu")`` for position ids and masks), so a traced archive runs on that device only.
``--device`` (auto: the CUDA device when there is one) is where the model is traced and
checked, and model.json's ``traced_on`` records it ("cpu", "cuda:0"); evaluate then runs
the archive there. A scripted archive runs on any device (``traced_on`` null). dynamic-int8
runs on the CPU only: with auto it is made on the CPU, and a CUDA ``--device`` is refused.
model.json files from before ``traced_on`` hold CPU traces.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import ConfigError, WriteError, first_line, is_write_failure, write_error
from distill.pipeline.data import DataConfig, DataFlags, load_data
from distill.pipeline.files import read_json, write_json, write_text
from distill.pipeline.modelcard import CARD_FILE, card_path, quantized_card
from distill.pipeline.modelfiles import model_bytes
from distill.pipeline.config import check_settings, setting
from distill.pipeline.models import LoadedModel, ModelConfig, ModelFlags, load_model
from distill.pipeline.runtime import resolve_device

__all__ = ["METHODS", "QuantizeConfig", "quantize_model", "Int8WeightOnlyLinear"]

METHODS = ("dynamic-int8", "weight-only-int8")
_OUTPUT_ENTRIES = frozenset({"model", "model.tmp", "summary.json"})
_DATA_KEYS = ("data", *(f.name for f in dataclasses.fields(DataFlags) if f.name != "limit"))  # a run's config.json keys


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(DataFlags, ModelFlags):
    """Settings of `distill quantize` (each field's help is its flag's).

    The data flags say which examples trace a model that does not script; by default the
    run directory's own data settings (its config.json).
    """

    model: str | None = setting(None, "The model to quantize: a run directory, a Hugging Face causal LM, a built-in "
                                      "or package.module:factory.")
    out: str = setting("", "Output run directory: model/model.pt (TorchScript), model/model.json, summary.json.")
    method: str = setting("dynamic-int8", "dynamic-int8 (CPU kernels) or weight-only-int8 (for a GPU; runs anywhere).",
                          choices=METHODS)
    overwrite: bool = setting(False, "Replace another quantized model in --out (the same model and method is redone "
                                     "without it).")
    data: str | None = setting(None, "Examples to trace a model that TorchScript cannot compile.",
                               default_help="the run directory's data")
    device: str = setting("auto", "Where the quantized model will run: auto, cpu, cuda or cuda:N (auto: the CUDA "
                                  "device when there is one). A traced model is traced there and runs only there; "
                                  "dynamic-int8 runs on the CPU only.")

    def __post_init__(self):
        check_settings(self)
        if not self.model or not self.out:
            raise ConfigError("missing --model or --out: quantize needs the model and an output directory")
        if self.method == "dynamic-int8" and _device_type(self.device) not in ("cpu", None):
            raise ConfigError(f"dynamic-int8 runs on the CPU only (fbgemm/qnnpack kernels), not on --device "
                              f"{self.device}: use --method weight-only-int8 for a GPU, or --device cpu")


def _device_type(name: str) -> str | None:
    """The type of device ``name`` ("cuda" for "cuda:1"); None for auto or a name torch does not know."""
    try:
        return None if name == "auto" else torch.device(name).type
    except RuntimeError:
        return None


def quantize_model(config: QuantizeConfig) -> dict:
    """Quantize ``config.model`` into ``config.out``; returns the summary (also written to summary.json).

    Summary: out, method, source, task, params, quantized_linears, bytes_before (the source's
    saved weights, as evaluate counts them), bytes_after (model.pt), size_ratio, export (script or trace),
    traced_on (the device a traced archive runs on, "cpu" or "cuda:N"; None for a scripted one, which runs anywhere).
    """
    if not os.path.exists(config.model) and os.sep in config.model:
        raise ConfigError(f"model {config.model!r}: no such run directory or file; check the path")
    auto_cpu = config.method == "dynamic-int8" and config.device == "auto"  # its kernels are on the CPU
    device = torch.device("cpu") if auto_cpu else resolve_device(config.device)  # where a trace runs
    source = load_model(ModelConfig(config.model, weights=config.weights, task=config.task,
                                    trust_remote_code=config.trust_remote_code))
    linears = _check_quantizable(config, source)
    _prepare_out(config, source)
    quantized = _quantize(source.module, config.method)
    exported, how, traced_on = _export(config, source, quantized, device)
    bytes_before, _ = model_bytes(source)
    summary = {"out": config.out, "method": config.method, "source": config.model, "task": source.task,
               "params": exported.num_parameters, "quantized_linears": linears, "export": how,
               "traced_on": traced_on, "bytes_before": bytes_before}
    bytes_after = _save(config, source, exported, summary)
    summary.update(bytes_after=bytes_after, size_ratio=bytes_after / bytes_before if bytes_before else None)
    write_text(os.path.join(config.out, "model", CARD_FILE), quantized_card(_source_card(config.model), summary))
    if bytes_after >= bytes_before:
        summary["note"] = ("the quantized model is not smaller on disk: its TorchScript code and the layers left "
                           "in float (embeddings, convolutions, a tied output layer stored twice) outweigh the "
                           "int8 Linear weights")
    write_json(os.path.join(config.out, "summary.json"), summary)
    return summary


def _source_card(model: str) -> str | None:
    """The card distill wrote beside the source model (a run directory's model/README.md), or None."""
    path = card_path(model) if os.path.isdir(model) else None
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


# --- checks and the output directory -------------------------------------------------------------

def _check_quantizable(config: QuantizeConfig, source: LoadedModel) -> int:
    kind = source.describe.get("kind")
    if kind == "torchscript":
        raise ConfigError(f"{config.model!r} is a TorchScript model (already exported, perhaps already quantized): "
                          "quantize the run directory or model it came from")
    if kind == "hf" and source.task != "causal-lm":
        raise ConfigError(f"{config.model!r} is a Hugging Face classifier, which needs its attention mask and cannot "
                          "be exported to TorchScript taking token ids alone: quantize causal LMs, built-ins or factories")
    count = sum(isinstance(m, nn.Linear) or _is_hf_conv1d(m) for m in source.module.modules())
    if count == 0:
        raise ConfigError(f"model {config.model!r} has no nn.Linear layers, which is what quantize makes int8: "
                          "there is nothing to quantize")
    return count


def _prepare_out(config: QuantizeConfig, source: LoadedModel) -> None:
    """A new or empty --out, an interrupted one, or the same quantization again; anything else is refused."""
    out = os.path.abspath(config.out)
    if os.path.isdir(config.model) and out == os.path.abspath(config.model):
        raise ConfigError("--out is the model's own run directory: write the quantized model to a new --out")
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise ConfigError(f"--out {config.out} is a file: choose a directory")
    if not all(e in _OUTPUT_ENTRIES or e.startswith("summary.json.tmp") for e in os.listdir(out)):  # .tmp: a crash
        raise ConfigError(f"{config.out} exists and is not a quantize output: choose a new --out")
    saved = read_json(os.path.join(out, "model", "model.json"))
    if not isinstance(saved, dict):
        return  # interrupted before its model was in place
    same = saved.get("source_fingerprint") == source.fingerprint and saved.get("method") == config.method
    if not same and not config.overwrite:
        raise ConfigError(f"{config.out} holds another quantized model ({saved.get('method')} of "
                          f"{saved.get('source')}): use a new --out, or --overwrite to replace it")


# --- quantizing ----------------------------------------------------------------------------------

def _quantize(module: nn.Module, method: str) -> nn.Module:
    module = _as_linears(copy.deepcopy(module).float().eval())
    if method == "weight-only-int8":
        return _weight_only(module)
    quantization = getattr(torch, "ao", None) and getattr(torch.ao, "quantization", None)
    quantize_dynamic = getattr(quantization, "quantize_dynamic", None)
    if quantize_dynamic is None:
        raise ConfigError(f"this torch ({torch.__version__}) has no torch.ao.quantization.quantize_dynamic: "
                          "use --method weight-only-int8")
    with warnings.catch_warnings():  # deprecated in favour of torchao, which torch does not ship
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*")
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a Linear with a transposed (in, out) weight."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int) \
        and getattr(module, "weight", None) is not None and module.weight.dim() == 2


def _as_linears(module: nn.Module) -> nn.Module:
    """``module`` with every transformers Conv1D replaced by the nn.Linear it computes, so it is quantized too."""
    for name, child in module.named_children():
        if _is_hf_conv1d(child):
            linear = nn.Linear(child.weight.shape[0], child.nf, bias=child.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(child.weight.t())  # (in, out) -> (out, in)
                if child.bias is not None:
                    linear.bias.copy_(child.bias)
            setattr(module, name, linear)
        else:
            _as_linears(child)
    return module


class Int8WeightOnlyLinear(nn.Module):
    """A Linear with int8 weights and one float32 scale per output channel, dequantised at matmul time.

    forward(x (..., in_features)) -> (..., out_features) in x's dtype.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny) / 127.0  # (out,)
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]  # (out, in)
        bias = self.bias
        return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _weight_only(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear(child))
        else:
            _weight_only(child)
    return module


# --- exporting -----------------------------------------------------------------------------------

class _Exported(nn.Module):
    """The quantized model plus what load_model and evaluate read from it (attribute types inferred by TorchScript)."""

    def __init__(self, inner: nn.Module, source: LoadedModel):
        super().__init__()
        self.inner = inner
        self.task, self.output_size = source.task, source.output_size
        self.num_parameters = sum(p.numel() for p in source.module.parameters())
        digest = bytes.fromhex(source.fingerprint.split(":")[-1])
        self.register_buffer("source_fingerprint", torch.tensor(list(digest), dtype=torch.uint8))

    def forward(self, x: torch.Tensor):
        return self.inner(x)


class _HFCausalLM(nn.Module):
    """A Hugging Face causal LM as ids (B, L) -> logits (B, L, V): right padding needs no mask under causal attention."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


def _export(config: QuantizeConfig, source: LoadedModel, quantized: nn.Module,
            device: torch.device) -> tuple[torch.jit.ScriptModule, str, str | None]:
    """The archive, "script" or "trace", and the device a trace ran on (None for a script, which runs anywhere)."""
    with warnings.catch_warnings():  # torch marks TorchScript deprecated; it is the format that loads without pickles
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        inner = None
        if source.describe.get("kind") != "hf":
            try:
                inner = torch.jit.script(quantized)
            except Exception:  # TorchScript cannot compile this Python: trace it on examples instead
                inner = None
        if inner is not None:
            return torch.jit.script(_Exported(inner, source)), "script", None
        traced, traced_on = _trace(config, source, _HFCausalLM(quantized) if source.describe.get("kind") == "hf"
                                   else quantized, device)
        return torch.jit.script(_Exported(traced.cpu(), source)), "trace", traced_on  # saved on the CPU, as loaded


def _trace(config: QuantizeConfig, source: LoadedModel, module: nn.Module,
           device: torch.device) -> tuple[torch.jit.ScriptModule, str]:
    """``module`` traced on ``device`` and checked there on other shapes; and that device ("cpu", "cuda:0")."""
    example, check = _examples(config, source)
    module, example, check = module.to(device), example.to(device), check.to(device)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # checked below instead
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecated attributes it reads
            traced = torch.jit.trace(module, example, check_trace=False, strict=False)
            same = _close(traced(check), module(check))
    except Exception as e:  # tracing runs the user's code: anything may fail
        raise ConfigError(f"model {config.model!r} cannot be exported to TorchScript ({first_line(e, 200)}): it cannot be "
                          "quantized; quantize a built-in or a scriptable model") from None
    if not same:
        raise ConfigError(f"model {config.model!r} traces to TorchScript only for the shapes it was traced with "
                          "(its outputs differ on other shapes): it cannot be quantized")
    return traced, str(example.device)  # the trace's code names this device: it runs there only


def _close(a, b) -> bool:
    a = getattr(a, "logits", a[0] if isinstance(a, (tuple, list)) else a)
    b = getattr(b, "logits", b[0] if isinstance(b, (tuple, list)) else b)
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4)


def _examples(config: QuantizeConfig, source: LoadedModel) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs to trace with (2 examples) and to check the trace on (3 others; token ids cut shorter)."""
    settings = _data_settings(config)
    data = load_data(DataConfig(**settings, task=source.task, limit=config.limit))
    if len(data) == 0:
        raise ConfigError(f"data {settings['data']!r} has no examples to trace the model with: check --data and --split")
    items = [data[i % len(data)] for i in range(5)]
    first, second = data.collate(items[:2]), data.collate(items[2:])
    if "inputs" in first:
        return first["inputs"], second["inputs"]
    ids = second["input_ids"]  # (3, L)
    return first["input_ids"], ids[:, : max(2, ids.shape[1] // 2)]


def _data_settings(config: QuantizeConfig) -> dict:
    """--data and its flags, else the data settings the run directory was trained with."""
    if config.data:
        return {("spec" if k == "data" else k): getattr(config, k) for k in _DATA_KEYS}
    saved = read_json(os.path.join(config.model, "config.json"))  # a training run's settings
    if not isinstance(saved, dict) or not saved.get("data") or "out" not in saved:
        raise ConfigError(f"model {config.model!r} does not compile with TorchScript and has to be traced on examples: "
                          "pass --data (and its --tokenizer, --seq-len) to trace it with")
    settings = {k: saved.get(k) for k in _DATA_KEYS}
    settings["seq_len"] = settings["seq_len"] or 256
    settings["split"] = settings["split"] or "train"
    return {("spec" if k == "data" else k): v for k, v in settings.items()}


# --- saving --------------------------------------------------------------------------------------

def _save(config: QuantizeConfig, source: LoadedModel, exported: torch.jit.ScriptModule, summary: dict) -> int:
    """Write OUT/model/ (model.pt, model.json) in a temporary directory, then move it in place; returns model.pt's bytes.

    A full disk or a read-only --out is a one-line WriteError; no half-written model/ is left in place.
    """
    directory = os.path.join(config.out, "model")
    tmp = directory + ".tmp"
    try:
        _save_files(config, source, exported, summary, tmp)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    except Exception as e:  # torch.jit.save reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, WriteError) or not is_write_failure(e):
            raise
        raise write_error(e, f"the quantized model in {directory}") from None
    return os.path.getsize(os.path.join(directory, "model.pt"))


def _save_files(config: QuantizeConfig, source: LoadedModel, exported: torch.jit.ScriptModule, summary: dict,
                tmp: str) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.jit.save(exported, os.path.join(tmp, "model.pt"))
    write_json(os.path.join(tmp, "model.json"), {
        "kind": "torchscript", "file": "model.pt", "method": config.method, "task": source.task,
        "output_size": source.output_size, "source": os.path.abspath(config.model) if os.path.exists(config.model)
        else config.model, "source_fingerprint": source.fingerprint, "export": summary["export"],
        "traced_on": summary["traced_on"]})
