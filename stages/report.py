"""`distill report`: one self-contained HTML page about a distillation: curves, comparison, soft labels.

Reads top to bottom: read the run directories (and quantized-model directories), the
`distill evaluate --json` reports and the soft-label stores, draw each section's plot with
matplotlib (Agg, no display), and write one HTML file whose PNGs are base64 data URIs and
whose CSS is inline, so it can be mailed or attached as it is. Sections:

    runs              a table: name, stage, model, parameters, steps, final loss, final held-out metric
    training curves   the loss terms of every run, one panel per kind (hard-label CE, each kind of
                      soft term, a mixed total), and the held-out metric (bars at one point a run)
    comparison        teacher, students and quantized models as bars: held-out metric, size on disk,
                      parameters and, from `distill evaluate`, latency; without evaluate's reports
                      the run directories' own figures, and latency is said to be unmeasured;
                      coloured by role (a hard-label run that taught no student is a baseline)
    soft labels       each store's histogram of top-k mass per position (the store given with
                      ``labels``, or those the student runs were trained on)
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import os

from distill import __version__
from distill.errors import ConfigError, DistillError
from distill.pipeline.charts import ROLE_COLOURS, curves_png, figure, human_count, png_base64
from distill.pipeline.config import check_settings, setting
from distill.pipeline.files import read_json, write_text
from distill.pipeline.formatting import byte_unit, human_bytes
from distill.pipeline.modelfiles import weight_files_bytes
from distill.pipeline.rundir import RunDir, eval_metric, is_quantized_dir, is_run_dir, load_run
from distill.pipeline.timing import speedup_text

__all__ = ["ReportConfig", "run_roles", "write_report"]

HISTOGRAM_BINS = 50


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Settings of `distill report` (each field's help is its flag's).

    ``evaluation`` files hold `distill evaluate --json` reports (one object, a list, or one
    object per line); a list of {"name", "metric", "value", "params", "bytes", "latency_ms",
    "throughput"} is read the same way.
    """

    runs: tuple[str, ...] = setting((), "Run directories (train-teacher, train-student) and quantize output "
                                        "directories.", cli=False)
    out: str = setting("report.html", "The HTML file to write (replaced atomically).")
    labels: str | None = setting(None, "A soft-label store for the top-k mass histogram.",
                                 default_help="the stores the student runs name")
    evaluation: tuple[str, ...] = setting((), "JSON from `distill evaluate --json` for the comparison; repeat for "
                                              "several files.")
    title: str = setting("distill report", "The page's title.")
    sample: int | None = setting(None, "Shards read for each store's histogram, as for inspect --sample.", minimum=0)

    def __post_init__(self):
        for name in ("runs", "evaluation"):  # a TOML file may give one path as a string
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        check_settings(self)
        if not self.runs:
            raise ConfigError("no run directories: pass one or more RUN_DIR (the --out of train-teacher or train-student)")
        if not self.out:
            raise ConfigError("missing --out: pass the HTML file to write")


@dataclasses.dataclass
class _Model:
    """One bar group of the comparison."""

    name: str
    role: str
    metric: str | None = None
    value: float | None = None
    params: int | None = None
    bytes: int | None = None
    latency_ms: float | None = None
    throughput: float | None = None
    throughput_unit: str = ""
    spec: str | None = None
    speedup: float | None = None  # the teacher's latency / this one's, as `distill evaluate` printed it
    from_teacher: bool = False  # figures copied from a student's report's "teacher"


def write_report(config: ReportConfig) -> str:
    """Write the report; returns the path of the HTML file."""
    runs, quantized = _load_dirs(config.runs)
    names = _unique_names([r.path for r in runs] + [q["path"] for q in quantized])
    evaluations = [e for path in config.evaluation for e in _read_evaluation(path)]
    roles = run_roles(runs, {_key(e.get("model")) for e in evaluations if e.get("role") == "teacher"})
    models = _models_from_dirs(runs, quantized, names, roles)
    if evaluations:
        models = _models_from_evaluations(evaluations, runs, quantized, names, roles)
    stores = _stores(config, runs, names)
    sections = [_runs_section(runs, quantized, names), _curves_section(runs, names, _methods(runs)),
                _comparison_section(models, measured=bool(evaluations)), _labels_section(stores, config.sample)]
    write_text(config.out, _page(config.title, len(config.runs), sections))
    return config.out


# --- reading the inputs ----------------------------------------------------------------------------

def _load_dirs(paths: tuple[str, ...]) -> tuple[list[RunDir], list[dict]]:
    runs, quantized = [], []
    for path in paths:
        if not is_run_dir(path) and is_quantized_dir(path):
            quantized.append({**read_json(os.path.join(path, "summary.json")), "path": path})
        else:
            runs.append(load_run(path))  # a missing or foreign directory is a one-line ConfigError
    return runs, quantized


def _unique_names(paths: list[str]) -> list[str]:
    """Each path's last component, or as many trailing components as make the names distinct."""
    parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [os.path.normpath(p) for p in paths]


def _read_evaluation(path: str) -> list[dict]:
    """`distill evaluate --json` reports from ``path``, with a report's teacher as an entry of its own."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read --evaluation {path}: {e.strerror}; pass a file written by `distill evaluate --json`") from None
    try:
        data = json.loads(text)
        items = data if isinstance(data, list) else [data]
    except ValueError:
        try:
            items = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise ConfigError(f"--evaluation {path} is not JSON: pass the output of `distill evaluate --json` "
                              "(one object per line, or a JSON list)") from None
    out = []
    for item in items:
        if not isinstance(item, dict) or "metric" not in item or "value" not in item:
            raise ConfigError(f"--evaluation {path} holds an entry without metric and value: pass the output of "
                              "`distill evaluate --json`")
        out.append(item)
        if isinstance(item.get("teacher"), dict):
            out.append({**item["teacher"], "role": "teacher"})
    return out


def _stores(config: ReportConfig, runs: list[RunDir], names: list[str]) -> list[tuple[str, str | None]]:
    """(store, the run that names it, or None for --labels), each store once."""
    if config.labels:
        return [(config.labels, None)]
    seen = {}
    for run, name in zip(runs, names):
        store = run.config.get("labels")
        if store and store not in seen:
            seen[store] = name
    return list(seen.items())


# --- the comparison's entries -----------------------------------------------------------------------

def run_roles(runs: list[RunDir], teachers: set[str | None]) -> list[str]:
    """Each run's role: "student" (train-student), else "teacher" or "baseline" (hard labels alone, not a teacher).

    teachers: the normalised paths `distill evaluate` reports name as teachers; without any, a
    train-teacher run is a baseline when it trains a model that a student run here trains too
    (the student's architecture from scratch), and a teacher otherwise.
    """
    teachers = teachers - {None}
    student_models = {r.config.get("model") for r in runs if r.stage == "train-student"}
    def role(run: RunDir) -> str:
        if run.stage == "train-student":
            return "student"
        taught = _key(run.path) in teachers if teachers else run.config.get("model") not in student_models
        return "teacher" if taught else "baseline"
    return [role(r) for r in runs]


def _models_from_dirs(runs: list[RunDir], quantized: list[dict], names: list[str], roles: list[str]) -> list[_Model]:
    models = []
    for run, name, role in zip(runs, names, roles):
        metric = eval_metric(run.evals[-1]) if run.evals else None
        models.append(_Model(name, role, *(metric or (None, None)), params=run.params,
                             bytes=(weight_files_bytes(os.path.join(run.path, "model")) or (None,))[0]))
    for q, name in zip(quantized, names[len(runs):]):
        models.append(_Model(name, "quantized", params=q.get("params"), bytes=q.get("bytes_after")))
    return models


def _models_from_evaluations(evaluations: list[dict], runs: list[RunDir], quantized: list[dict],
                             names: list[str], roles: list[str]) -> list[_Model]:
    """One entry per evaluated model, named as its directory is here: the last report of the model itself wins,
    and a report's teacher figures count only for a teacher with no report of its own."""
    known = {_key(r.path): (n, role) for r, n, role in zip(runs, names, roles)}
    known.update({_key(q["path"]): (n, "quantized") for q, n in zip(quantized, names[len(runs):])})
    entries: dict[str, _Model] = {}
    for e in evaluations:
        spec = e.get("model") if isinstance(e.get("model"), str) else None
        name, role = known.get(_key(spec), (None, None)) if spec else (None, None)
        if name is None:
            name = str(e.get("name") or (os.path.basename(os.path.normpath(spec)) if spec else f"model {len(entries) + 1}"))
            role = e.get("role") or _role_of_spec(spec)
        if e.get("role") == "teacher" and name in entries and not entries[name].from_teacher:
            continue  # the teacher's own report beats the copy of its figures in a student's report
        entries[name] = _Model(name, e.get("role", role), e.get("metric"), _number(e.get("value")), e.get("params"),
                               e.get("bytes"), _number(e.get("latency_ms")), _number(e.get("throughput")),
                               e.get("throughput_unit", ""), spec, _number(e.get("speedup")),
                               from_teacher=e.get("role") == "teacher")
    order = {n: i for i, n in enumerate(names)}  # the order given on the command line, then the others
    return sorted(entries.values(), key=lambda m: order.get(m.name, len(order)))


def _key(path: str | None) -> str | None:
    return os.path.normpath(os.path.abspath(path)) if path else None


def _role_of_spec(spec: str | None) -> str:
    """quantized for a `distill quantize` directory, a run's role for a run directory, else model."""
    if not spec or not os.path.isdir(spec):
        return "model"
    if is_quantized_dir(spec):
        return "quantized"
    if is_run_dir(spec):
        return "student" if load_run(spec).stage == "train-student" else "teacher"
    return "model"


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# --- sections: (title, text, png or None, table html) ------------------------------------------------

def _runs_section(runs: list[RunDir], quantized: list[dict], names: list[str]) -> tuple:
    rows = []
    for run, name in zip(runs, names):
        metric = eval_metric(run.evals[-1]) if run.evals else None
        loss = run.train[-1].get("loss") if run.train else None
        steps = max([m.get("step", 0) for m in run.train + run.evals], default=0)
        rows.append([name, run.stage, run.config.get("model"), _fmt(run.params), _fmt(steps), _fmt(loss),
                     f"{metric[0]} {metric[1]:.4g}" if metric else "-", "yes" if run.final_model else "no"])
    for q, name in zip(quantized, names[len(runs):]):
        rows.append([name, f"quantize ({q.get('method')})", q.get("source"), _fmt(q.get("params")), "-", "-", "-", "yes"])
    table = _table(["run", "stage", "model", "parameters", "steps", "final loss", "final held-out", "final model"], rows)
    text = (f"{len(runs)} training run(s)" + (f" and {len(quantized)} quantized model(s)" if quantized else "") +
            ". Final loss is the last logged training loss; final held-out is the last evaluation on the held-out split.")
    return "Runs", text, None, table


def _curves_section(runs: list[RunDir], names: list[str], methods: list[str | None]) -> tuple:
    text = ("Training losses per logged step, one panel per kind of quantity so that a cross-entropy and a "
            "divergence never share an axis: the hard-label cross-entropy (a train-teacher run's loss, a student's "
            "CE term), each kind of soft term (a sampled store's is a cross-entropy: the KL plus the teacher's "
            "entropy), and a student's total where it mixes the two. Then the held-out metric at each evaluation "
            "(bars when every run has one evaluation). Every run in its own colour.")
    if not runs or not any(r.train or r.evals for r in runs):
        return "Training curves", text + " No run has logged metrics yet.", None, ""
    return "Training curves", text, curves_png(runs, names, methods), ""


def _methods(runs: list[RunDir]) -> list[str | None]:
    """Each run's store method ("topk", "sample"), None for a teacher run or a store that cannot be read."""
    from distill.storage import open_store

    def method(run: RunDir) -> str | None:
        try:
            return open_store(run.config["labels"]).spec.method if run.config.get("labels") else None
        except DistillError:
            return None
    return [method(r) for r in runs]


def _comparison_section(models: list[_Model], measured: bool) -> tuple:
    if measured:
        text = ("From `distill evaluate --json`: the held-out metric, the size of the saved weights on disk, the "
                "parameters and the latency of one forward pass at batch 1 (the fastest of interleaved timed calls) "
                "of each model.")
    else:
        text = ("From the run directories: the last held-out metric, the size of the saved weights on disk and the "
                "parameters. Latency was not measured: run `distill evaluate --model DIR --data DATA --json` for each "
                "model and pass the output with --evaluation.")
    text += (" Bar colours: blue teacher, orange student, purple baseline (trained on hard labels alone, not a "
             "teacher), green quantized, grey other models. Against the teacher: its latency over the model's, as "
             "`distill evaluate` timed the two together.")
    rows = [[m.name, m.role, f"{m.metric} {m.value:.4g}" if m.metric and m.value is not None else "-", _fmt(m.params),
             "-" if m.bytes is None else human_bytes(m.bytes, decimals=1), f"{m.latency_ms:.3g} ms" if m.latency_ms is not None else "not measured",
             f"{m.throughput:,.0f} {m.throughput_unit}".strip() if m.throughput is not None else "-",
             speedup_text(m.speedup) if m.speedup else "-"] for m in models]
    table = _table(["model", "role", "held-out metric", "parameters", "size on disk", "latency (batch 1)", "throughput",
                    "against the teacher"], rows)
    return "Teacher, students and quantized models", text, _comparison_png(models), table


def _labels_section(stores: list[tuple[str, str | None]], sample: int | None) -> tuple:
    from distill.storage import label_figures, open_store

    title = "Soft labels: top-k mass per position"
    if not stores:
        return title, "No store to show: pass --labels STORE (the student runs here name none).", None, ""
    text = ["How much of the teacher's probability the stored ids hold, per position: mass near 1 means the top-k "
            "keeps almost all of each distribution; mass spread to the left means the tail bucket carries much of it. "
            "Entropy is over the k+1 buckets (ids plus tail), a lower bound of the teacher's true entropy."]
    figures = []
    for store, named_by in stores:
        try:
            reader = open_store(store)
            f = label_figures(reader, sample, bins=HISTOGRAM_BINS)
        except DistillError as e:
            if named_by is None:
                raise
            text.append(f"The store {store} of run {named_by} could not be read ({e}).")
            continue
        p = f["topk_mass_percentiles"]
        read = (f"a sample of {f['figures_shards_read']:,} shards" if f["figures_sampled"]
                else f"all {f['figures_shards_read']:,} shards")
        text.append(f"{store} ({reader.spec.method}, k={reader.spec.k}, vocabulary {reader.spec.vocab_size:,}; {read}, "
                    f"{f['figures_positions']:,} positions): top-k mass mean {p['mean']:.4f}, p1 {p['p1']:.4f}, "
                    f"p50 {p['p50']:.4f}, p99 {p['p99']:.4f}; teacher entropy over the buckets "
                    f"{f['teacher_entropy_buckets_mean']:.4f} nats.")
        figures.append((store, f["topk_mass_histogram"]))
    return title, " ".join(text), _histogram_png(figures) if figures else None, ""


# --- plots --------------------------------------------------------------------------------------------

def _comparison_png(models: list[_Model]) -> str:
    from matplotlib.ticker import FuncFormatter

    metrics = sorted({m.metric for m in models if m.metric and m.value is not None})
    panels = [(f"held-out {metric}", lambda m, metric=metric: m.value if m.metric == metric else None, "{:.4g}".format)
              for metric in metrics]
    scale, unit = byte_unit(max((m.bytes or 0) for m in models))
    panels += [(f"size on disk ({unit})", lambda m: m.bytes / scale if m.bytes is not None else None, "{:.4g}".format),
               ("parameters", lambda m: m.params, human_count)]
    if any(m.latency_ms is not None for m in models):
        panels.append(("latency, batch 1 (ms)", lambda m: m.latency_ms, "{:.3g}".format))
    fig, axes = figure(len(panels), row_height=max(2.2, 0.9 + 0.45 * len(models)))
    labels = [m.name for m in models]
    colours = [ROLE_COLOURS.get(m.role, ROLE_COLOURS["model"]) for m in models]
    for ax, (title, value, text) in zip(axes, panels):
        values = [value(m) for m in models]
        bars = ax.barh(labels, [v or 0 for v in values], color=colours)
        ax.bar_label(bars, labels=[text(v) if v is not None else "n/a" for v in values], fontsize=8, padding=2)
        if text is human_count:  # 141k, not 1.411e+05
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: human_count(x)))
        ax.set_title(title)
        ax.invert_yaxis()
        ax.margins(x=0.25)
    return png_base64(fig)


def _histogram_png(figures: list[tuple[str, list[int]]]) -> str:
    fig, axes = figure(len(figures), columns=3)
    for ax, (store, counts) in zip(axes, figures):
        width = 1 / len(counts)
        ax.bar([i * width for i in range(len(counts))], counts, width=width, align="edge", color=ROLE_COLOURS["teacher"])
        ax.set(title=os.path.basename(os.path.normpath(store)) or store, xlabel="top-k mass of a position",
               ylabel="positions", xlim=(0, 1))
    return png_base64(fig)


# --- the page -----------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; } .meta { color: #777; margin-top: 0; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; }
"""


def _page(title: str, n_inputs: int, sections: list[tuple]) -> str:
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    body = [f"<h1>{html.escape(title)}</h1>",
            f'<p class="meta">distill {__version__}, {when}, {n_inputs} input director{"y" if n_inputs == 1 else "ies"}</p>']
    for heading, text, png, table in sections:
        body.append(f"<section><h2>{html.escape(heading)}</h2><p>{html.escape(text)}</p>")
        if png:
            body.append(f'<img src="data:image/png;base64,{png}" alt="{html.escape(heading)}">')
        body.append(f"{table}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    cells = lambda row: "".join(f"<td>{html.escape(str(c) if c is not None else '-')}</td>" for c in row)  # noqa: E731
    return f"<table><tr>{head}</tr>" + "".join(f"<tr>{cells(r)}</tr>" for r in rows) + "</table>"


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
