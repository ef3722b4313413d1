"""What `distill report`'s plots show and how: which curves share an axis, role colours, tick labels.

Decisions about the plots are plain functions here (tested without drawing); matplotlib is
imported only by ``figure``, when a plot is drawn.
"""

from __future__ import annotations

import base64
import io

from distill.errors import ConfigError
from distill.pipeline.rundir import RunDir, eval_metric

__all__ = ["ROLE_COLOURS", "HARD_CE", "human_count", "soft_term_kind", "loss_panels", "curves_png", "held_out_panel",
           "figure", "png_base64"]

# a run trained on hard labels alone is a teacher only when it taught: a from-scratch baseline has its own colour
ROLE_COLOURS = {"teacher": "#1f77b4", "student": "#ff7f0e", "baseline": "#9467bd", "quantized": "#2ca02c",
                "model": "#7f7f7f"}
HARD_CE = "cross-entropy on the hard labels"


def human_count(n: float) -> str:
    """A count at three significant digits with k / M / B: 141100 -> ``141k``, 1411000 -> ``1.41M``, 950 -> ``950``."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale * 0.9995:  # 999,600 reads 1M, not 1e+03k
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def soft_term_kind(loss: str | None, method: str | None) -> str:
    """What a student's logged ``soft`` term is, from its --loss and its store's method (None: unknown).

    A sampled store's soft term is a cross-entropy (the KL plus the teacher's entropy: nats
    above the KL), so it never shares an axis with a divergence over top-k buckets.
    """
    if loss == "argmax":
        return "cross-entropy on the teacher's top-1"
    if method == "sample":
        return "sampled cross-entropy"
    if method is None:
        return f"{loss or 'kl'} (store not readable: kind unknown)"
    return f"{loss or 'kl'} over the top-k buckets"


def loss_panels(runs: list[RunDir], methods: list[str | None]) -> dict[str, list[tuple[int, str]]]:
    """Which training curves share an axis: {panel title: [(run index, metrics key), ...]}, in first-use order.

    runs: the run directories; methods: each one's store method ("topk", "sample"; None for a
    teacher run or an unreadable store). One panel per kind of quantity: the hard-label
    cross-entropy (a train-teacher run's loss, a student's ``ce``), each kind of soft term, and
    a student's total loss where it mixes the two (alpha > 0), per soft kind.
    """
    panels: dict[str, list[tuple[int, str]]] = {}
    for i, (run, method) in enumerate(zip(runs, methods)):
        logged = {key for line in run.train for key, value in line.items() if isinstance(value, (int, float))}
        if run.stage != "train-student":
            if "loss" in logged:
                panels.setdefault(HARD_CE, []).append((i, "loss"))
            continue
        kind = soft_term_kind(run.config.get("loss"), method)
        if "soft" in logged:
            panels.setdefault(f"soft term: {kind}", []).append((i, "soft"))
        if "ce" in logged:
            panels.setdefault(HARD_CE, []).append((i, "ce"))
            panels.setdefault(f"total loss: hard CE and {kind}", []).append((i, "loss"))
    return panels


def curves_png(runs: list[RunDir], names: list[str], methods: list[str | None]) -> str:
    """The training curves of ``runs`` (named ``names``; store methods as for ``loss_panels``) as base64 PNG:
    a panel per ``loss_panels`` entry, then one per held-out metric (``held_out_panel``)."""
    panels = loss_panels(runs, methods)
    metrics = sorted({m[0] for r in runs for e in r.evals if (m := eval_metric(e))})
    fig, axes = figure(len(panels) + len(metrics), columns=3)
    for ax, (title, series) in zip(axes, panels.items()):
        for i, key in series:
            points = [(m["step"], m[key]) for m in runs[i].train if isinstance(m.get(key), (int, float))]
            ax.plot(*zip(*points), "-", color=f"C{i % 10}", label=names[i])
        ax.set(title=title, xlabel="step", ylabel="nats")
        ax.legend(fontsize=8)
    for ax, metric in zip(axes[len(panels):], metrics):
        held_out_panel(ax, metric, runs, names)
    return png_base64(fig)


def held_out_panel(ax, metric: str, runs: list[RunDir], names: list[str]) -> None:
    """Draws on ``ax`` the held-out ``metric`` per run: lines over steps, or one bar per run when no run has two evaluations."""
    points = [[(e["step"], e[metric]) for e in r.evals if isinstance(e.get(metric), (int, float))] for r in runs]
    shown = [i for i, p in enumerate(points) if p]
    if all(len(points[i]) == 1 for i in shown):  # one point per run is no curve
        bars = ax.bar([names[i] for i in shown], [points[i][0][1] for i in shown],
                      color=[f"C{i % 10}" for i in shown])
        ax.bar_label(bars, labels=[f"{points[i][0][1]:.4g}" for i in shown], fontsize=8)
        ax.set(title=f"held-out {metric} (final)", ylabel=metric)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        return
    for i in shown:
        ax.plot(*zip(*points[i]), "o-", color=f"C{i % 10}", label=names[i])
    ax.set(title=f"held-out {metric}", xlabel="step", ylabel=metric)
    ax.legend(fontsize=8)


def figure(panels: int, row_height: float = 3.6, columns: int = 2):
    """A matplotlib Figure (Agg, no display, no pyplot state) and its ``panels`` axes, ``columns`` to a row."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("distill report draws its plots with matplotlib: pip install matplotlib") from None
    columns = min(columns, panels)
    rows = -(-panels // columns)
    fig = Figure(figsize=(5.6 * columns, row_height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]


def png_base64(fig) -> str:
    """``fig`` as a PNG, base64 text for a data URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")
