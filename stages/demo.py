"""`distill demo`: the whole recipe on the built-in mnist1d data, in minutes on a CPU.

The setting is the one where distillation is known to pay: a *transfer set*. Hard labels
exist for 4,000 examples only; the teacher (a 1-D CNN) is trained on those; then it labels
20,000 inputs (the 4,000 and 16,000 more without hard labels) into a soft-label store.
The same small student (an MLP) is trained three ways for the same number of steps:

1. from scratch on the 4,000 hard labels (what you would do without a teacher);
2. on the teacher's hard pseudo-labels (its top-1 class) over the 20,000 inputs;
3. distilled from the store's soft labels over the 20,000 inputs (forward KL at T = 1, no
   hard labels; T = 1 beat Hinton's T = 2 here: 76.3% against 72.3%, see the README).

The distilled student is then quantised to int8, and everything is evaluated on 5,000
held-out examples: accuracy, agreement with the teacher, size, latency and throughput.
The difference between 2 and 3 is what soft targets add over hard ones on the same
inputs; between 1 and 2, what the teacher's labels on more inputs add. Rerunning resumes:
finished steps are not redone.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from distill.errors import write_error
from distill.pipeline.files import write_json
from distill.pipeline.formatting import human_bytes
from distill.pipeline.runtime import resolve_device

__all__ = ["DemoSettings", "run_demo"]


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; ``quick()`` is a smaller version for tests."""

    num_samples: int = 25000  # mnist1d examples generated: 80% train (the transfer set), 20% test
    labelled: int = 4000  # the first N training examples keep their hard labels
    teacher: str = "cnn:channels=64"
    student: str = "mlp:hidden=128"
    teacher_epochs: int = 30
    student_epochs: int = 30  # on the labelled examples; the transfer-set runs take the same number of steps
    lr: float = 3e-3
    batch_size: int = 32

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(num_samples=2500, labelled=400, teacher="cnn:channels=16", student="mlp:hidden=32",
                   teacher_epochs=3, student_epochs=3)


def run_demo(out_dir: str, settings: DemoSettings = DemoSettings(), progress: bool = True,
             device: str = "auto") -> dict:
    """Run the recipe into ``out_dir``; print the table and the retention line; return the evaluations.

    ``device`` runs every stage there (``auto``: this machine's GPU if it has one); the int8
    student, whose kernels are the CPU's, is evaluated on the CPU beside the teacher.
    """
    from distill.stages.evaluate import EvaluateConfig, evaluate_models, retention_line
    from distill.stages.generate import GenerateConfig, generate_labels
    from distill.stages.quantize import QuantizeConfig, quantize_model
    from distill.stages.train import StudentConfig, TrainConfig, train_student, train_teacher

    s = settings
    data = f"mnist1d:num_samples={s.num_samples}"
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    transfer = int(s.num_samples * 0.8)
    transfer_epochs = max(1, round(s.student_epochs * s.labelled / transfer))
    common = dict(data=data, lr=s.lr, batch_size=s.batch_size, eval_split="test", workers=0, progress=False,
                  device=device)
    resolve_device(device)  # a bad --device is refused before anything is written
    clock = _Clock(progress)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise write_error(e, f"the demo directory {out_dir}") from None

    clock.step(f"teacher {s.teacher} on {s.labelled:,} labelled examples, {s.teacher_epochs} epochs")
    train_teacher(TrainConfig(out=path("teacher"), model=s.teacher, epochs=s.teacher_epochs, limit=s.labelled, **common))
    clock.step(f"teacher labels {transfer:,} inputs (the transfer set) into a soft-label store")
    generate_labels(GenerateConfig(teacher=path("teacher"), data=data, out=path("labels.zarr"), progress=False,
                                   device=device))
    clock.step(f"student {s.student} from scratch on the {s.labelled:,} hard labels, {s.student_epochs} epochs")
    train_teacher(TrainConfig(out=path("student-scratch"), model=s.student, epochs=s.student_epochs, limit=s.labelled,
                              **common))
    kd = dict(labels=path("labels.zarr"), model=s.student, epochs=transfer_epochs, alpha=0.0, **common)
    clock.step(f"student on the teacher's hard pseudo-labels over the transfer set, {transfer_epochs} epochs")
    train_student(StudentConfig(out=path("student-pseudo"), loss="argmax", **kd))
    clock.step(f"student distilled from the soft labels over the transfer set (T=1), {transfer_epochs} epochs")
    train_student(StudentConfig(out=path("student-distilled"), temperature=1.0, **kd))
    clock.step("distilled student quantised to int8 (dynamic, Linear layers)")
    quantize_model(QuantizeConfig(model=path("student-distilled"), out=path("student-distilled-int8")))

    clock.step("evaluate everything on the held-out test split")
    names = ["teacher", "student-scratch", "student-pseudo", "student-distilled", "student-distilled-int8"]
    configs = [EvaluateConfig(model=path(name), data=data, teacher=None if name == "teacher" else path("teacher"),
                              split="test", device="cpu" if name.endswith("int8") else device)  # int8: CPU kernels
               for name in names]
    results = dict(zip(names, evaluate_models(configs)))  # each model timed once, all together: one set of figures
    write_json(path("evaluation.json"), [{"name": name, **r} for name, r in results.items()])
    clock.step("report")
    report = _report(out_dir, names, path)
    clock.done()

    print(_table(results), flush=True)
    print(retention_line(results["student-distilled"]), flush=True)
    print(retention_line(results["student-distilled-int8"], name="int8 student"), flush=True)
    print(f"report: {report}   (runs, store and evaluation.json under {out_dir}/)", flush=True)
    return results


def _table(results: dict) -> str:
    header = ("model", "accuracy", "agreement", "params", "size", "latency (batch 1)", "throughput")
    rows = [header]
    for name, r in results.items():
        agreement = r.get("agreement")
        rows.append((name, f"{r['value']:.1%}", "-" if agreement is None else f"{agreement:.1%}", f"{r['params']:,}",
                     human_bytes(r["bytes"], decimals=1), f"{r['latency_ms']:.3f} ms", f"{r['throughput']:,.0f}/s"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _report(out_dir: str, names: list[str], path) -> str:
    from distill.stages.report import ReportConfig, write_report

    runs = tuple(path(n) for n in names if os.path.isfile(os.path.join(path(n), "metrics.jsonl")))
    return write_report(ReportConfig(runs=runs, out=path("report.html"), labels=path("labels.zarr"),
                                     evaluation=(path("evaluation.json"),), title="distill demo: mnist1d"))


class _Clock:
    """One line per step with the time the previous one took (stderr)."""

    def __init__(self, enabled: bool):
        self.enabled, self.start, self.last, self.n = enabled, time.monotonic(), None, 0

    def step(self, what: str) -> None:
        self._close()
        self.n += 1
        self.last = time.monotonic()
        if self.enabled:
            print(f"[{self.n}] {what} ...", file=sys.stderr, flush=True)

    def _close(self) -> None:
        if self.last is not None and self.enabled:
            print(f"    {time.monotonic() - self.last:.0f} s", file=sys.stderr, flush=True)

    def done(self) -> None:
        self._close()
        if self.enabled:
            print(f"demo finished in {time.monotonic() - self.start:.0f} s", file=sys.stderr, flush=True)
