"""Run the distill CLI with one deterministic kill point: SIGKILL at the Nth call of a chosen step.

    python faults.py TARGET:N[:PHASE] ARGS...      (ARGS as for `distill`)

TARGET and PHASE:
    forward      the Nth teacher/student forward pass: "during" (before it returns, default) or "after"
    shard-file   the Nth data file of a shard: "during" (half its bytes written: a torn file) or "after"
    commit       the Nth shard commit record: "during" (half of its temporary file written) or "after" (in place)
    manifest     the Nth manifest.json write (1: created, 2: sealed): "during" or "after"
    checkpoint   the Nth checkpoint: "during" (weights written, trainer.pt half written),
                 "pointer" (directory renamed into place, `latest` not yet updated) or "after" (all written)

The process dies by SIGKILL (exit status -9): no handler, no finally block, no flush runs,
exactly as with `kill -9`. A run that never reaches the point exits normally, so callers
check the status to know the point was hit.
"""

import os
import signal
import sys

KINDS = ("forward", "shard-file", "commit", "manifest", "checkpoint")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def torn(path: str, data: bytes) -> None:
    """Leave the first half of ``data`` at ``path``, as a crash mid-write does, and die."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    die()


def install(spec: str) -> None:
    target, n, *rest = spec.split(":")
    phase = rest[0] if rest else "during"
    if target not in KINDS:
        raise SystemExit(f"faults.py: unknown target {target!r}; use one of {', '.join(KINDS)}")
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == int(n)

    if target == "forward":
        from distill.pipeline.models import LoadedModel

        real_logits = LoadedModel.logits

        def logits(self, batch):
            if not hit():
                return real_logits(self, batch)
            if phase == "after":
                real_logits(self, batch)
            die()

        LoadedModel.logits = logits
    elif target in ("shard-file", "commit", "manifest"):
        from distill.storage.fs import StoreFS

        real_write = StoreFS._write

        def _write(self, path, data, atomic):
            kind = "commit" if path.endswith(".commit.json") else "manifest" if path.endswith("manifest.json") else "shard-file"
            if kind != target or not hit():
                return real_write(self, path, data, atomic)
            if phase == "during":
                torn(path if not atomic else f"{path}.tmp-killed000000", data)
            real_write(self, path, data, atomic)
            die()

        StoreFS._write = _write
    else:
        _install_checkpoint(phase, hit)


def _install_checkpoint(phase: str, hit) -> None:
    import io

    import torch

    import distill.pipeline.trainer as trainer

    real_save, real_replace, real_checkpoint = torch.save, os.replace, trainer.save_checkpoint
    state = {"armed": False}

    def save_checkpoint(run_dir, step, model, trainer_state):
        state["armed"] = hit()
        path = real_checkpoint(run_dir, step, model, trainer_state)
        if state["armed"] and phase == "after":
            die()
        return path

    def save(obj, f, *args, **kwargs):
        if state["armed"] and phase == "during" and str(f).endswith("trainer.pt"):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            torn(str(f), buffer.getvalue())
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        if state["armed"] and phase == "pointer" and str(dst).endswith(os.sep + "latest"):
            die()
        return real_replace(src, dst, *args, **kwargs)

    trainer.save_checkpoint = save_checkpoint
    torch.save = save
    os.replace = replace


if __name__ == "__main__":
    install(sys.argv[1])
    from distill.cli import main

    main(sys.argv[2:])
