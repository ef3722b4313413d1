"""The model card beside every trained model: ``RUN/model/README.md`` in the Hugging Face model-card format.

A card is YAML metadata between ``---`` lines, then Markdown. The metadata: ``license``
(the teacher's, from the store's provenance, or as given; ``unknown`` when neither says),
``base_model`` (the teacher, when it is named like a Hub repository: a local path or a
built-in spec is no Hub id and stays in the body), ``datasets`` (likewise), ``tags``
(``distillation`` for a student, plus the task's) and ``library_name`` (transformers for a
Hugging Face model, else pytorch). The body says how the model was made (the store's method,
k and temperatures; the loss, temperature, alpha and steps), the teacher's and the dataset's
provenance as the store records it (``extra["provenance"]``; an older store has none, and the
card says what the manifest alone knows), and a results section between two HTML comments
that ``distill evaluate`` replaces each time it runs on the run directory. ``distill quantize``
writes a card for its output: the source's, results emptied, plus how it was quantised.

Nothing in a card is legal advice: the licence is what the teacher's metadata declares.
"""

from __future__ import annotations

import os
import re
import sys

import yaml

from distill.errors import WriteError, first_line
from distill.pipeline.files import write_text

__all__ = ["CARD_FILE", "RESULTS_START", "RESULTS_END", "training_card", "card_path", "update_results", "record_results",
           "quantized_card", "split_card"]

CARD_FILE = "README.md"
RESULTS_START = "<!-- distill:results -->"
RESULTS_END = "<!-- /distill:results -->"
_TASK_TAGS = {"causal-lm": "text-generation", "classification": "classification"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_NO_RESULTS = "Not evaluated yet: `distill evaluate --model RUN_DIR --teacher TEACHER` writes its table here."


def training_card(how: dict, task: str | None, library: str, spec=None, license: str | None = None) -> str:
    """The card of a model a training run made, as text.

    how:     the run's settings shown in the body, in order ({"student": spec, "loss": "kl", "steps": 30, ...}).
    task:    "classification" or "causal-lm" (None: unknown).
    library: "transformers" or "pytorch".
    spec:    the store's ``StoreSpec`` for a student (None for train-teacher's model).
    license: overrides the teacher's licence from the store's provenance.
    """
    provenance = (spec.extra.get("provenance") if spec is not None else None) or {}
    teacher, dataset = provenance.get("teacher") or {}, provenance.get("dataset") or {}
    meta = {"license": license or teacher.get("license") or "unknown"}
    if _hub_id(teacher.get("name_or_path")):
        meta["base_model"] = teacher["name_or_path"]
    if _hub_id(dataset.get("spec")):
        meta["datasets"] = [dataset["spec"]]
    meta["tags"] = (["distillation"] if spec is not None else []) + ([_TASK_TAGS[task]] if task in _TASK_TAGS else [])
    meta["library_name"] = library
    kind = "a student distilled with distill" if spec is not None else "a model trained with distill (train-teacher)"
    body = [f"# {how.get('student') or how.get('model') or 'model'}", "", f"This is {kind}.", "",
            "## How it was made", "", *_how_lines(how, spec)]
    if spec is not None:
        body += ["", "## Teacher", "", *_teacher_lines(teacher, spec, provenance),
                 "", "## Data", "", *_dataset_lines(dataset, spec)]
    body += ["", "## Results", "", RESULTS_START, _NO_RESULTS, RESULTS_END, "",
             "The licence above is what the teacher's metadata declares; this card is not legal advice."]
    return _join(meta, "\n".join(body))


def card_path(model: str) -> str | None:
    """The distill-written card of a run or quantize directory (``MODEL/model/README.md``) or model directory, or None."""
    for path in (os.path.join(model, "model", CARD_FILE), os.path.join(model, CARD_FILE)):
        try:
            with open(path, encoding="utf-8") as f:
                if RESULTS_START in f.read():  # never touch a README distill did not write
                    return path
        except OSError:
            continue
    return None


def update_results(text: str, results: str) -> str:
    """``text`` (a card) with its results section replaced by ``results`` (Markdown): rerunning replaces it again."""
    start, end = text.find(RESULTS_START), text.find(RESULTS_END)
    if start < 0 or end < start:
        return text.rstrip("\n") + f"\n\n## Results\n\n{RESULTS_START}\n{results.strip()}\n{RESULTS_END}\n"
    return text[:start + len(RESULTS_START)] + "\n" + results.strip() + "\n" + text[end:]


def record_results(model: str, results: str) -> str | None:
    """Replace the results section of ``model``'s distill-written card (``card_path``) by ``results`` (Markdown).

    Returns the card's path, or None when ``model`` has no such card (a built-in, a Hub model, an older run) or
    it cannot be written (a read-only directory: said on stderr, not an error).
    """
    path = card_path(model) if os.path.isdir(model) else None
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        write_text(path, update_results(text, results))
    except (OSError, WriteError) as e:  # a read-only run directory: the evaluation itself still stands
        print(f"distill: the model card {path} was left as it was ({first_line(e, 160)})", file=sys.stderr)
        return None
    return path


def quantized_card(source: str | None, quantization: dict) -> str:
    """The card of a `distill quantize` output: ``source`` (the source model's card, or None) carried over with
    its results emptied, ``library_name: pytorch``, a ``quantized`` tag, and a section saying how it was quantised.

    quantization: the quantize summary ({"method", "source", "export", "quantized_linears", "bytes_before", ...}).
    """
    meta, body = split_card(source) if source else ({"license": "unknown"}, f"# {quantization.get('source')}\n")
    tags = [t for t in meta.get("tags") or [] if t not in ("quantized", "int8")]
    meta = {**meta, "tags": tags + ["quantized", "int8"], "library_name": "pytorch"}
    body = update_results(body, _NO_RESULTS)
    how = [f"Quantised by `distill quantize --method {quantization.get('method')}` from "
           f"`{quantization.get('source')}`: {quantization.get('quantized_linears')} Linear layers to int8, "
           f"exported as a TorchScript archive ({quantization.get('export')}"
           + (f", traced on {quantization['traced_on']}" if quantization.get("traced_on") else "") + ")."]
    if quantization.get("bytes_after") is not None:
        how.append(f"Weights on disk: {quantization.get('bytes_before'):,} bytes before, "
                   f"{quantization['bytes_after']:,} after.")
    start = body.find("## Results")
    section = "## Quantization\n\n" + "\n".join(how) + "\n\n"
    body = body[:start] + section + body[start:] if start >= 0 else body.rstrip("\n") + "\n\n" + section
    return _join(meta, body)


def split_card(text: str) -> tuple[dict, str]:
    """A card's (metadata, body); text without a YAML front matter (or with a broken one) has empty metadata."""
    match = re.match(r"---\n(.*?)\n---\n?", text, re.DOTALL)
    if match is None:
        return {}, text
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}, text[match.end():]
    return (meta if isinstance(meta, dict) else {}), text[match.end():]


# --- pieces -------------------------------------------------------------------------------------------

def _join(meta: dict, body: str) -> str:
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{header}---\n\n{body.lstrip(chr(10)).rstrip(chr(10))}\n"


def _hub_id(name) -> bool:
    """True for a Hub repository name ("gpt2", "org/model"): not a local path, not a distill spec."""
    return isinstance(name, str) and bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name) \
        and ".." not in name and not name.endswith((".txt", ".jsonl", ".parquet"))


def _how_lines(how: dict, spec) -> list[str]:
    lines = []
    if spec is not None:
        temperatures = ", ".join(f"{t:g}" for t in spec.temperatures)
        lines.append(f"- store: method {spec.method}, k {spec.k}, temperatures {temperatures}, "
                     f"{spec.num_examples:,} examples")
    lines += [f"- {name}: {_value(value)}" for name, value in how.items() if value is not None]
    return lines


def _teacher_lines(teacher: dict, spec, provenance: dict) -> list[str]:
    if not teacher:
        return [f"- fingerprint: `{spec.teacher_fingerprint or 'unknown'}`",
                "- the store records no more about the teacher (made before provenance was recorded)"]
    keys = ("spec", "name_or_path", "architecture", "revision", "parameters", "license", "license_source",
            "weights_fingerprint", "run_dir")
    lines = [f"- {key}: {_value(teacher[key])}" for key in keys if teacher.get(key) is not None]
    lines.append(f"- store fingerprint: `{spec.teacher_fingerprint or 'unknown'}`")
    if provenance.get("license_acknowledged"):
        lines.append(f"- licence acknowledged with --accept-teacher-license {provenance['license_acknowledged']}")
    for key in ("command", "tool_version", "created"):
        if provenance.get(key):
            lines.append(f"- store {key.replace('_', ' ')}: {_value(provenance[key])}")
    return lines


def _dataset_lines(dataset: dict, spec) -> list[str]:
    if not dataset:
        return [f"- {spec.num_examples:,} examples, fingerprint `{spec.dataset_fingerprint or 'unknown'}`"]
    keys = ("spec", "split", "examples", "fingerprint", "license")
    return [f"- {key}: {_value(dataset[key])}" for key in keys if dataset.get(key) is not None]


def _value(value) -> str:
    """A value as Markdown: numbers plain, strings in code spans (paths and specs hold * and _)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f"`{value}`"
    if isinstance(value, str):
        return f"`{value.replace('`', chr(39))}`"
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
