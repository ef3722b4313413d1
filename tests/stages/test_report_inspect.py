"""`distill inspect` on stores (the distribution figures) and run directories, and `distill report`."""

import base64
import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.pipeline.rundir import load_run
from distill.stages.inspection import run_summary
from distill.storage import StoreSpec, create_store, figure_shards, open_store, sampled_labels, topk_labels
from distill.storage.synthetic import zipf_logits

MNIST = "mnist1d:num_samples=600"
V, K = 300, 8


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, f"{result.output}\n{result.stderr}"
    return result


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_store(url, method="topk", n_examples=40, per_shard=8, encoding="sqrt"):
    """Ragged LM-like labels (0 to 4 positions per example) in a finalized store."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 5, (n_examples,), generator=g)
    logits = zipf_logits(int(lengths.sum()), V, g)
    if method == "topk":
        labels = topk_labels(logits, K, (2.0,), lengths=lengths)
    else:
        labels = sampled_labels(logits, K, (2.0,), lengths=lengths, generator=g)
    spec = StoreSpec(method, k=K, vocab_size=V, num_examples=n_examples, examples_per_shard=per_shard,
                     temperatures=(1.0, 2.0), value_encoding=encoding, teacher_fingerprint="t", dataset_fingerprint="d")
    writer = create_store(str(url), spec)
    for i in writer.pending_shards():
        writer.write_shard(i, labels.examples(*spec.shard_range(i)))
    writer.finalize()
    return str(url)


def naive_figures(url):
    """Per-position top-k mass and bucket entropy from read_all(), float64, one position at a time."""
    labels = open_store(url).read_all()
    mass, entropy = [], []
    for lp, tail in zip(labels.topk_logprobs.double().tolist(), labels.tail_logprob.double().tolist()):
        p = [np.exp(x) for x in lp + [tail] if x != float("-inf")]
        mass.append(1.0 - np.exp(tail))
        entropy.append(-sum(q * np.log(q) for q in p if q > 0))
    return np.array(mass), np.array(entropy), labels


# --- stores ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["sqrt", "lossless"])
def test_store_figures_match_a_naive_computation(tmp_path, encoding):
    url = write_store(tmp_path / "topk", encoding=encoding)
    summary = last_json(ok("inspect", url, "--json"))
    mass, entropy, _ = naive_figures(url)
    p = summary["topk_mass_percentiles"]
    assert list(p) == ["p1", "p10", "p50", "p90", "p99", "mean"]
    quantiles = [p[f"p{q}"] for q in (1, 10, 50, 90, 99)]
    assert quantiles == sorted(quantiles) and 0 < quantiles[0] and quantiles[-1] <= 1
    exact = np.percentile(mass, [1, 10, 50, 90, 99], method="inverted_cdf")
    assert np.allclose(quantiles, exact, atol=2e-5)  # the fine histogram's resolution is 1e-5
    assert p["mean"] == pytest.approx(mass.mean(), rel=1e-9)
    # the records' mean is the writer's, before encoding: sqrt stores the tail as float16
    assert p["mean"] == pytest.approx(summary["topk_mass_mean"], abs=1e-9 if encoding == "lossless" else 1e-4)
    histogram = summary["topk_mass_histogram"]
    assert len(histogram) == 10 and sum(histogram) == summary["positions"] == len(mass)
    assert histogram == np.histogram(mass, bins=10, range=(0, 1))[0].tolist()
    assert summary["teacher_entropy_buckets_mean"] == pytest.approx(entropy.mean(), rel=1e-9)
    assert not summary["figures_sampled"] and summary["figures_shards_read"] == summary["shards_complete"] == 5
    assert "unique_ids_mean" not in summary


def test_sampled_store_reports_unique_ids(tmp_path):
    url = write_store(tmp_path / "sampled", method="sample", encoding="lossless")
    summary = last_json(ok("inspect", url, "--json"))
    mass, entropy, labels = naive_figures(url)
    assert summary["unique_ids_mean"] == pytest.approx(float((labels.counts > 0).sum(1).double().mean()))
    assert summary["teacher_entropy_buckets_mean"] == pytest.approx(entropy.mean(), rel=1e-9)
    assert summary["topk_mass_percentiles"]["mean"] == pytest.approx(mass.mean(), rel=1e-9)


def test_sample_reads_evenly_spaced_shards_and_says_so(tmp_path):
    url = write_store(tmp_path / "topk")
    reader = open_store(url)
    assert figure_shards(reader, 2) == [0, 4] and figure_shards(reader, 0) == figure_shards(reader, 99) == [0, 1, 2, 3, 4]
    summary = last_json(ok("inspect", url, "--json", "--sample", 2))
    positions = sum(reader.records[i].positions for i in (0, 4))
    assert summary["figures_sampled"] and summary["figures_shards_read"] == 2
    assert sum(summary["topk_mass_histogram"]) == summary["figures_positions"] == positions
    assert summary["positions"] == reader.num_positions  # the record figures still cover the whole store
    human = ok("inspect", url, "--sample", 2).stdout
    assert "a sample of 2 of 5 shards" in human and "--sample 0 reads every shard" in human


def test_human_output_says_the_entropy_is_a_lower_bound(tmp_path):
    out = ok("inspect", write_store(tmp_path / "topk")).stdout
    assert "lower bound of the true entropy" in out and "topk mass percentiles" in out
    assert "topk mass histogram" in out and re.search(r"0\.9-1\.0 .* \d", out)
    assert "5 of 5 complete" in out and "all 5 complete shards" in out


def test_damaged_shard_is_skipped_and_exits_1_without_verify(tmp_path):
    url = write_store(tmp_path / "topk", encoding="lossless")
    chunk = next(p for p in (tmp_path / "topk" / "shards" / "000002").rglob("c/*") if p.is_file())
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-1] + bytes([data[-1] ^ 0x40]))
    result = invoke("inspect", url, "--json")
    assert result.exit_code == 1
    summary = last_json(result)
    assert summary["figures_skipped_shards"] == [2] and summary["figures_shards_read"] == 4
    assert sum(summary["topk_mass_histogram"]) == summary["figures_positions"]


def test_unknown_paths_are_one_line_errors(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    for path in (tmp_path / "other", tmp_path / "other" / "notes.txt", tmp_path / "missing"):
        result = invoke("inspect", path)
        assert result.exit_code == 2, path
        assert result.stderr.startswith("distill: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert "neither a soft-label store" in invoke("inspect", tmp_path / "other").stderr


# --- run directories -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A teacher (5 steps), its top-3 labels on the training split, and a student (6 steps)."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--data", MNIST, "--eval-split", "test", "--eval-every", 2, "--workers", 0, "--log-every", 1, "--no-progress",
              "--device", "cpu"]
    ok("train-teacher", "--model", "mlp:hidden=16", "--steps", 5, "--out", root / "teacher", *common)
    ok("generate-labels", "--teacher", root / "teacher", "--data", MNIST, "--out", root / "labels", "--k", 3,
       "--examples-per-shard", 100, "--no-progress", "--device", "cpu")
    ok("train-student", "--labels", root / "labels", "--student", "mlp:hidden=8", "--steps", 6, "--out",
       root / "student", "--alpha", 0.3, *common)
    return root


def test_inspect_run_dir_json(runs):
    summary = last_json(ok("inspect", runs / "teacher", "--json"))
    assert summary["stage"] == "train-teacher" and summary["steps_done"] == 5 and summary["checkpoint_step"] == 5
    assert summary["config"]["model"] == "mlp:hidden=16" and summary["config"]["steps"] == 5
    assert summary["last_train"]["step"] == 5 and "loss" in summary["last_train"]
    assert summary["last_eval"]["step"] == 5 and 0 <= summary["last_eval"]["accuracy"] <= 1
    assert summary["final_model"] and summary["finished"] and summary["params"] > 0
    student = last_json(ok("inspect", runs / "student", "--json"))
    assert student["stage"] == "train-student" and student["steps_done"] == 6
    assert {"labels", "loss", "temperature", "alpha"} <= student["config"].keys() and student["config"]["alpha"] == 0.3
    assert "soft" in student["last_train"]


def test_inspect_run_dir_human(runs):
    out = ok("inspect", runs / "student").stdout
    for text in ("train-student", "mlp:hidden=8", "labels", "temperature 2, alpha 0.3", "steps done",
                 "latest checkpoint: step 6", "last training  step 6:", "last eval", "accuracy", "final model    yes"):
        assert text in out, text


def test_a_run_in_progress_has_no_final_model(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"out": "run", "model": "mlp", "data": MNIST, "lr": 1e-3}))
    summary = run_summary(load_run(str(tmp_path / "run")))
    assert summary["steps_done"] == 0 and not summary["final_model"] and summary["last_eval"] is None
    assert ok("inspect", tmp_path / "run").stdout.count("no (the run has not finished)") == 1


# --- report ----------------------------------------------------------------------------------------------

PNG = '<img src="data:image/png;base64,'


def pngs(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def assert_self_contained(html: str) -> None:
    assert "://" not in html  # no external URL (base64 has no ':')
    assert all(src.startswith("data:") for src in re.findall(r'(?:src|href)="([^"]*)"', html))
    assert "<script" not in html and "<link" not in html


def test_report_is_one_self_contained_page(runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "deep" / "report.html"
    result = ok("report", runs / "teacher", runs / "student", "--out", out)
    assert str(out) in result.stdout
    html = out.read_text()
    assert html.count(PNG) == 3  # training curves, comparison bars, the store's histogram
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs(html))
    assert_self_contained(html)
    for text in ("<h2>Runs</h2>", "<td>teacher</td>", "<td>student</td>", "Training curves", "mlp:hidden=8",
                 "Latency was not measured", "lower bound"):
        assert text in html, text
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]  # no temporary file left behind


def test_report_takes_evaluation_json(runs, tmp_path):
    pytest.importorskip("matplotlib")
    teacher = {"model": str(runs / "teacher"), "metric": "accuracy", "value": 0.5, "params": 1098, "bytes": 4848,
               "latency_ms": 0.2, "throughput": 9000.0, "throughput_unit": "examples/s"}
    lines = [{**teacher, "model": str(runs / "student"), "value": 0.4, "params": 490, "latency_ms": 0.1, "teacher": teacher},
             {"name": "student-int8", "metric": "accuracy", "value": 0.39, "params": 490, "bytes": 900, "latency_ms": 0.05,
              "throughput": 12000.0}]
    evaluation = tmp_path / "eval.json"
    evaluation.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    out = tmp_path / "report.html"
    ok("report", runs / "teacher", runs / "student", "--evaluation", evaluation, "--labels", runs / "labels",
       "--out", out, "--title", "mnist1d <recipe>")
    html = out.read_text()
    assert html.count(PNG) == 3 and "not measured" not in html and "0.05 ms" in html
    assert "<td>student-int8</td>" in html and "mnist1d &lt;recipe&gt;" in html
    assert html.count("<td>teacher</td><td>teacher</td>") == 1  # the comparison holds the teacher once
    assert_self_contained(html)


def test_report_refuses_what_it_cannot_read(runs, tmp_path):
    out = tmp_path / "report.html"
    for args in ([runs / "teacher", tmp_path / "missing"], [runs / "labels"], [runs / "teacher", "--evaluation", runs / "teacher" / "config.json"]):
        result = invoke("report", *args, "--out", out)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("distill: error: ") and result.stderr.count("\n") == 1, result.stderr
    assert not out.exists()
    assert invoke("report", "--out", out).exit_code == 2


def test_inspect_a_quantize_output_directory(tmp_path):
    from distill.stages.quantize import QuantizeConfig, quantize_model
    from distill.stages.train import TrainConfig, train_teacher

    train_teacher(TrainConfig(out=str(tmp_path / "run"), model="mlp:hidden=8", data="mnist1d:num_samples=300",
                              steps=2, workers=0, progress=False, device="cpu"))
    quantize_model(QuantizeConfig(model=str(tmp_path / "run"), out=str(tmp_path / "q")))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "q"), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["method"] == "dynamic-int8" and summary["bytes_after"] > 0


def test_a_hard_label_run_that_taught_no_student_is_a_baseline_not_a_teacher(tmp_path):
    import os

    from distill.pipeline.charts import ROLE_COLOURS
    from distill.pipeline.rundir import RunDir
    from distill.stages.report import run_roles

    def run_dir(name, model, labels=None):
        config = {"model": model, "data": MNIST, "out": name, **({"labels": labels} if labels else {})}
        return RunDir(str(tmp_path / name), config, [], [], None, None)

    runs = [run_dir("teacher", "cnn"), run_dir("scratch", "mlp"), run_dir("student", "mlp", labels="store")]
    assert run_roles(runs, set()) == ["teacher", "baseline", "student"]  # scratch trains the student's model
    named = {os.path.normpath(str(tmp_path / "scratch"))}  # evaluate's reports name the teacher: they decide
    assert run_roles(runs, named | {None}) == ["baseline", "teacher", "student"]
    assert len({ROLE_COLOURS[r] for r in ("teacher", "baseline", "student", "quantized")}) == 4


def test_a_teachers_own_evaluation_beats_the_copy_in_a_students(runs, tmp_path):
    pytest.importorskip("matplotlib")
    teacher = {"model": str(runs / "teacher"), "metric": "accuracy", "value": 0.5, "params": 1098, "bytes": 4848,
               "latency_ms": 0.25, "throughput": 9000.0, "throughput_unit": "examples/s"}
    lines = [teacher, {**teacher, "model": str(runs / "student"), "latency_ms": 0.125, "speedup": 2.0,
                       "teacher": {**teacher, "latency_ms": 7.0}}]
    evaluation = tmp_path / "eval.json"
    evaluation.write_text(json.dumps(lines))
    out = tmp_path / "report.html"
    ok("report", runs / "teacher", runs / "student", "--evaluation", evaluation, "--out", out)
    html = out.read_text()
    assert "<td>0.25 ms</td>" in html and "7 ms" not in html and "<td>2.0× faster</td>" in html
