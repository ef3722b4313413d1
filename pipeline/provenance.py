"""Where a store came from: the teacher's and the dataset's identity, and the teacher-licence check.

generate-labels records ``provenance(...)`` in the manifest as ``extra["provenance"]``
(docs/FORMAT.md); `distill inspect` shows it; the model card of a student repeats it.
Before anything is written, ``check_teacher_license`` stops a store whose teacher's licence
restricts training other models on its outputs, until the user acknowledges that licence.

Nothing here is legal advice: the table below flags licences whose text says something
about training on outputs, so that a person reads the terms before the GPU time is spent.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import struct
import sys

from distill.errors import ConfigError
from distill.pipeline.files import read_json
from distill.pipeline.rundir import is_run_dir

__all__ = ["RESTRICTED_LICENSES", "teacher_directory", "read_license", "teacher_identity", "dataset_identity",
           "check_teacher_license", "command_line", "provenance", "UNKNOWN_LICENSE"]

MAX_HEADER_BYTES = 100 << 20  # safetensors caps its JSON header at 100 MB
UNKNOWN_LICENSE = "unknown"  # what --accept-teacher-license names to acknowledge a teacher with no licence found

# Licence identifiers as Hugging Face model cards spell them (`license:`, or `license_name:` under
# `license: other`), mapped to what their text says about training other models on outputs.
# Only licences whose own text speaks of it are here (cc-by-nc-4.0, for one, restricts commercial
# use of the licensed material, not training on outputs, so it is not). Not legal advice.
RESTRICTED_LICENSES = {
    # Llama 2 Community License Agreement, 1.b.v: "You will not use the Llama Materials or any output or
    # results of the Llama Materials to improve any other large language model (excluding Llama 2 or
    # derivative works thereof)."
    "llama2": "forbids using its outputs to improve any other large language model (Llama 2 licence, 1.b.v)",
    # Meta Llama 3 Community License Agreement, 1.b.v: the same sentence, "(excluding Meta Llama 3 or
    # derivative works thereof)".
    "llama3": "forbids using its outputs to improve any other large language model (Llama 3 licence, 1.b.v)",
    # Llama 3.1 / 3.2 / 3.3 / 4 Community License Agreements, 1.b.i: "If you use the Llama Materials or any
    # outputs or results of the Llama Materials to create, train, fine tune, or otherwise improve an AI
    # model, which is distributed or made available, you shall also include "Llama" at the beginning of
    # any such AI model name."
    "llama3.1": "requires a model trained on its outputs and distributed to be named \"Llama...\" (1.b.i)",
    "llama3.2": "requires a model trained on its outputs and distributed to be named \"Llama...\" (1.b.i)",
    "llama3.3": "requires a model trained on its outputs and distributed to be named \"Llama...\" (1.b.i)",
    "llama4": "requires a model trained on its outputs and distributed to be named \"Llama...\" (1.b.i)",
    # Gemma Terms of Use, 1.1(e): "Model Derivatives" means ... "(iii) any other machine learning model which
    # is created by transfer of patterns of the weights, parameters, operations, or Output of Gemma, to that
    # model in order to cause that model to perform similarly to Gemma, including distillation methods ...";
    # 3.1 and 3.2: a Model Derivative carries Gemma's use restrictions and its terms are passed on with it.
    # (Gemma 4 is released under Apache 2.0, whose cards say apache-2.0, not gemma.)
    "gemma": "makes a model distilled from it a Gemma Model Derivative, bound by Gemma's terms (1.1(e), 3.1-3.2)",
}


def teacher_directory(spec: str) -> str | None:
    """The Hugging Face directory (one holding config.json) that the teacher spec ``spec`` loads, or None.

    A train-teacher run directory, or its ``model/``, counts as the model inside it.
    """
    for path in (spec, os.path.join(spec, "model")):
        config = read_json(os.path.join(path, "config.json"))
        if isinstance(config, dict) and not is_run_dir(path):  # a run's config.json holds its settings, not a model's
            return path
    return None


def read_license(directory: str) -> tuple[str | None, str | None]:
    """(licence identifier, the file it came from) of a model or dataset ``directory``; (None, None) when none.

    Looked for in config.json's "license", dataset_info.json's "license" (a saved `datasets`
    dataset), then README.md's YAML metadata (``license:``, or ``license_name:`` for "other").
    """
    for name in ("config.json", "dataset_info.json"):
        found = read_json(os.path.join(directory, name))
        value = found.get("license") if isinstance(found, dict) else None
        if isinstance(value, str) and value.strip().lower() not in ("", UNKNOWN_LICENSE, "other"):
            return value.strip().lower(), name
    meta = _card_metadata(os.path.join(directory, "README.md"))
    value = meta.get("license_name") if meta.get("license") == "other" and meta.get("license_name") else meta.get("license")
    if isinstance(value, list):  # a card may list several licences: the first is the model's own
        value = value[0] if value else None
    if isinstance(value, str) and value.strip().lower() not in ("", UNKNOWN_LICENSE, "other"):  # says nothing
        return value.strip().lower(), "README.md"
    return None, None


def _card_metadata(path: str) -> dict:
    """The YAML front matter of a model or dataset card (huggingface_hub's parser when installed), or {}."""
    if not os.path.isfile(path):
        return {}
    try:
        from huggingface_hub.repocard import metadata_load
    except ImportError:
        metadata_load = None
    try:
        if metadata_load is not None:
            return metadata_load(path) or {}
        import yaml

        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.startswith("---"):
            return {}
        meta = yaml.safe_load(text.split("---", 2)[1])
        return meta if isinstance(meta, dict) else {}
    except Exception:  # noqa: BLE001 - a malformed card has no licence we can read, which is what we say
        return {}


def _revision(directory: str) -> str | None:
    """The commit the directory was downloaded at or checked out from, when it says: config.json's
    ``_commit_hash``, the Hugging Face cache's ``snapshots/<hash>/``, or a git checkout's HEAD."""
    config = read_json(os.path.join(directory, "config.json")) or {}
    if isinstance(config.get("_commit_hash"), str):
        return config["_commit_hash"]
    real = os.path.realpath(directory)
    if os.path.basename(os.path.dirname(real)) == "snapshots":
        return os.path.basename(real)
    head = os.path.join(directory, ".git", "HEAD")
    if os.path.isfile(head):
        with open(head) as f:
            ref = f.read().strip()
        if not ref.startswith("ref: "):
            return ref
        target = os.path.join(directory, ".git", ref[5:])
        if os.path.isfile(target):
            with open(target) as f:
                return f.read().strip()
    return None


def _safetensors_parameters(directory: str) -> int | None:
    """Parameters in the directory's *.safetensors files, from their headers alone (no weights read)."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        return None
    total = 0
    try:
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))  # the format: an 8-byte length, then a JSON header
                if size > MAX_HEADER_BYTES:
                    return None
                header = json.loads(f.read(size))
            for key, entry in header.items():
                if key != "__metadata__":
                    count = 1
                    for dim in entry["shape"]:
                        count *= int(dim)
                    total += count
    except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error):
        return None  # a damaged file: loading the teacher says what is wrong with it; here the count is just unknown
    return total


def teacher_identity(spec: str, fingerprint: str | None = None, parameters: int | None = None) -> dict:
    """The teacher's identity for ``extra["provenance"]["teacher"]`` (docs/FORMAT.md): from its files when ``spec``
    is a Hugging Face directory (or a run directory holding one); ``fingerprint`` and ``parameters`` (counted
    from the loaded module) fill what the files do not say."""
    directory = teacher_directory(spec)
    parent = os.path.dirname(os.path.normpath(spec))
    run_dir = spec if is_run_dir(spec) else parent if os.path.basename(os.path.normpath(spec)) == "model" and \
        is_run_dir(parent) else None
    identity = {"spec": spec, "name_or_path": None, "architecture": None, "revision": None, "parameters": parameters,
                "license": None, "license_source": None, "weights_fingerprint": fingerprint,
                "run_dir": os.path.abspath(run_dir) if run_dir else None}
    if directory is None:
        return identity
    config = read_json(os.path.join(directory, "config.json")) or {}
    architectures = config.get("architectures")
    identity.update(name_or_path=config.get("_name_or_path") or None,
                    architecture=architectures[0] if isinstance(architectures, list) and architectures else
                    config.get("model_type"),
                    revision=_revision(directory))
    identity["parameters"] = _safetensors_parameters(directory) or parameters
    identity["license"], identity["license_source"] = read_license(directory)
    return identity


def dataset_identity(spec: str, split: str | None, examples: int, fingerprint: str) -> dict:
    """The dataset's identity for ``extra["provenance"]["dataset"]``; its licence from a directory's metadata (a saved
    DatasetDict keeps it in each split's folder)."""
    license_name = None
    if os.path.isdir(spec):
        license_name = read_license(spec)[0] or (read_license(os.path.join(spec, split))[0] if split else None)
    return {"spec": spec, "split": split, "examples": int(examples), "fingerprint": fingerprint,
            "license": license_name}


def check_teacher_license(teacher: dict, accepted: str | None, require_known: bool) -> None:
    """Raise a one-line ConfigError when the teacher's licence (``teacher_identity``'s) is in RESTRICTED_LICENSES,
    or unknown with ``require_known``, and ``accepted`` (--accept-teacher-license) does not name it."""
    name = teacher.get("license")
    given = accepted.strip().lower() if accepted else None
    if name is None:
        if require_known and given != UNKNOWN_LICENSE:
            raise ConfigError(f"the teacher {teacher['spec']!r} declares no licence (none in config.json or its README.md "
                              f"metadata) and --require-known-license is set: read its terms, then pass "
                              f"--accept-teacher-license {UNKNOWN_LICENSE} to go on")
        return
    if name in RESTRICTED_LICENSES and given != name:
        raise ConfigError(f"the teacher's licence {name!r} (from its {teacher.get('license_source')}) "
                          f"{RESTRICTED_LICENSES[name]}: read its terms, then pass --accept-teacher-license {name} "
                          "to go on (not legal advice)")


def command_line() -> str:
    """The command line as run (shlex-joined) under the CLI, or "python API" when called from Python."""
    try:
        import click

        if click.get_current_context(silent=True) is None:
            return "python API"
    except ImportError:
        return "python API"
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    if program in ("distill", "cli.py", "__main__.py"):
        return shlex.join(["distill", *sys.argv[1:]])
    return shlex.join(sys.argv)


def provenance(teacher: dict, dataset: dict, config: dict, tool_version: str, accepted: str | None) -> dict:
    """``extra["provenance"]``: the teacher and dataset identities, the command and settings, the tool version,
    the time (ISO 8601 UTC) and the acknowledged licence (``accepted``, lower-cased, or None)."""
    return {"teacher": teacher, "dataset": dataset, "command": command_line(), "config": _jsonable(config),
            "tool_version": tool_version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "license_acknowledged": accepted.strip().lower() if accepted else None}


def _jsonable(value):
    """``value`` with tuples as lists and anything JSON cannot hold as its str."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
