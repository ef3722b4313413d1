#!/usr/bin/env bash
# Create (or reuse) the project venv, install torch, then `pip install -e '.[test]'` (the test extra
# includes the lora, tensorboard and wandb extras, so `make test` runs their tests rather than skipping them).
#
#   VENV=.venv               where the venv lives
#   PYTHON=python3           interpreter that creates it
#   TORCH_SPEC="torch==2.5.1"  install exactly this torch (TORCH_INDEX_URL: extra index for it)
#   TORCH_CPU_VERSION=2.13.0   CPU build used when there is no GPU and no TORCH_SPEC
#
# Idempotent: a torch that already imports is kept, and the project install is skipped
# while the stamp file is newer than pyproject.toml.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"
TORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"
stamp="$VENV/.distill-installed"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup-venv: creating $VENV with $PYTHON"
    "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip=("$py" -m pip install --retries 1)

# Reads the installed version without importing torch (an import costs seconds).
torch_version() {
    "$py" -c 'import importlib.metadata as m, importlib.util as u
assert u.find_spec("torch"); print(m.version("torch"))' 2>/dev/null
}

if version="$(torch_version)"; then
    torch_note="kept torch $version already in $VENV"
else
    if [ -n "${TORCH_SPEC:-}" ]; then
        why="TORCH_SPEC"
        args=("$TORCH_SPEC")
        [ -n "${TORCH_INDEX_URL:-}" ] && args+=(--extra-index-url "$TORCH_INDEX_URL")
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        why="GPU found, CUDA build from PyPI"
        args=(torch)
    else
        why="no GPU, CPU build"
        args=("torch==${TORCH_CPU_VERSION}+cpu" --extra-index-url "$TORCH_CPU_INDEX")
    fi
    echo "setup-venv: installing ${args[*]} ($why)"
    "${pip[@]}" "${args[@]}"
    rm -f "$stamp"
    torch_note="installed torch $(torch_version) ($why)"
fi

if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
    project_note="project install up to date"
else
    "${pip[@]}" -e '.[test]'
    touch "$stamp"
    project_note="installed distill -e '.[test]'"
fi

echo "setup-venv: $VENV: $torch_note; $project_note"
