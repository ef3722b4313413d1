"""The report's plot decisions: count labels, which curves share an axis."""

import pytest

from distill.pipeline.charts import HARD_CE, figure, held_out_panel, human_count, loss_panels, soft_term_kind
from distill.pipeline.rundir import RunDir


def test_counts_read_like_people_write_them():
    assert [human_count(n) for n in (0, 950, 7434, 141_100, 999_600, 1_411_000, 2.5e9)] == \
        ["0", "950", "7.43k", "141k", "1M", "1.41M", "2.5B"]


def run(stage_student: bool, lines: list[dict], loss: str | None = None) -> RunDir:
    config = {"model": "mlp", "data": "d", "out": "o", **({"labels": "s", "loss": loss} if stage_student else {})}
    return RunDir("r", config, lines, [], None, None)


def test_a_sampled_cross_entropy_and_a_top_k_kl_never_share_an_axis():
    teacher = run(False, [{"step": 1, "loss": 2.0, "ce": 2.0}])
    topk = run(True, [{"step": 1, "loss": 0.1, "soft": 0.1, "ce": None}], loss="kl")
    sampled = run(True, [{"step": 1, "loss": 6.0, "soft": 6.0, "ce": None}], loss="kl")
    mixed = run(True, [{"step": 1, "loss": 1.0, "soft": 0.1, "ce": 1.9}], loss="kl")
    pseudo = run(True, [{"step": 1, "loss": 1.5, "soft": 1.5, "ce": None}], loss="argmax")
    panels = loss_panels([teacher, topk, sampled, mixed, pseudo], [None, "topk", "sample", "topk", "topk"])
    assert panels == {
        HARD_CE: [(0, "loss"), (3, "ce")],
        "soft term: kl over the top-k buckets": [(1, "soft"), (3, "soft")],
        "soft term: sampled cross-entropy": [(2, "soft")],
        "total loss: hard CE and kl over the top-k buckets": [(3, "loss")],
        "soft term: cross-entropy on the teacher's top-1": [(4, "soft")],
    }
    assert soft_term_kind("jsd", None) == "jsd (store not readable: kind unknown)"


def test_one_held_out_point_per_run_is_drawn_as_bars_and_more_as_lines():
    pytest.importorskip("matplotlib")
    one = [RunDir(n, {}, [], [{"step": 5, "accuracy": a}], None, None) for n, a in (("a", 0.5), ("b", 0.7))]
    fig, (bars, lines) = figure(2)
    held_out_panel(bars, "accuracy", one, ["a", "b"])
    assert [p.get_height() for p in bars.patches] == [0.5, 0.7] and not bars.lines
    two = [*one, RunDir("c", {}, [], [{"step": 5, "accuracy": 0.1}, {"step": 9, "accuracy": 0.2}], None, None)]
    held_out_panel(lines, "accuracy", two, ["a", "b", "c"])
    assert len(lines.lines) == 3 and not lines.patches
