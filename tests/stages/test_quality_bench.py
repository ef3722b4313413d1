"""benchmarks/quality.py --quick: every row of both workloads runs through the real stages (the LM workload
behind the slow marker), docs/RESULTS.md sections are written and replaced, and reruns reuse finished runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bench(tmp_path, *args):
    cmd = [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--quick", "--no-progress",
           "--work", str(tmp_path / "work"), "--out", str(tmp_path / "RESULTS.md"), "--json-out", str(tmp_path / "results"),
           *args]
    cpu_only = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the benchmark has no --device and runs on auto
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=cpu_only)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def test_quick_quality_benchmark_runs_every_mnist1d_row_and_writes_its_table(tmp_path):
    """The default suite's check (about 20 s): the classifier workload, every row, its section and JSON, a rerun."""
    summary, out = bench(tmp_path, "--workload", "mnist1d")
    mnist = summary["workloads"]["mnist1d"]["rows"]
    expected = ["scratch", "pseudo-labels", "online", "top-k k=1 + tail", "top-k k=5 + tail", "top-k k=10 + tail",
                "top-k k=5 + 4 tail draws", "top-k k=5, no tail", "lossless", "sampled, 1 per", "sampled, 4 per"]
    assert all(any(name in row for row in mnist) for name in expected), mnist
    assert sum(row.startswith("transfer set") for row in mnist) == 5
    assert all(0.0 <= v <= 1.0 for v in mnist.values())
    # k = V keeps every class and an empty tail: the stored loss is the online full-logit loss, on the same
    # examples in the same order from the same initialisation, so the two students end alike (the store's
    # values are rounded, hence not bit for bit)
    assert abs(mnist["labelled set | top-k k=10 + tail"] - mnist["labelled set | online, full logits"]) <= 0.01
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("<!-- quality:mnist1d:begin -->") == 1
    table = [line for line in text.splitlines() if line.startswith("| labelled set | top-k k=5 + tail, lossless")]
    lossy = [line for line in text.splitlines() if line.startswith("| labelled set | top-k k=5 + tail |")]
    bytes_of = lambda line: float(line.split("|")[7].split(";")[0])  # noqa: E731  (labels; on disk)
    assert bytes_of(table[0]) > bytes_of(lossy[0]) > 0  # the lossless store is larger
    assert "| target | result | met |" in text and "target:" in out and "KL(teacher ‖ student)" in text
    mnist_rows = json.loads((tmp_path / "results" / "mnist1d.json").read_text())["rows"]
    assert all("accuracy_per_seed" in r and "kl_to_teacher_mean" in r for r in mnist_rows)

    # a rerun reuses every finished run and rewrites its own section in place
    (tmp_path / "RESULTS.md").write_text(text + "\nkept by hand\n")
    again, _ = bench(tmp_path, "--workload", "mnist1d")
    assert again["workloads"]["mnist1d"]["rows"] == mnist and again["workloads"]["mnist1d"]["seconds"] < 20
    rewritten = (tmp_path / "RESULTS.md").read_text()
    assert rewritten.count("<!-- quality:mnist1d:begin -->") == 1 and rewritten.endswith("kept by hand\n")


@pytest.mark.slow  # about a minute on 2 cores: a teacher, a store per label kind and budget, students
def test_quick_quality_benchmark_runs_every_lm_row_and_writes_its_json(tmp_path):
    summary, out = bench(tmp_path, "--workload", "lm")
    lm = summary["workloads"]["lm"]["rows"]
    for budget in ("~30 B", "~60 B"):  # each kind of label at each storage budget
        assert sum(row.endswith(f"({budget})") for row in lm) == 3, lm
    assert all(math.isfinite(v) and 1.0 < v < 600 for v in lm.values()), lm  # perplexity under a vocabulary of 512
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("<!-- quality:lm:begin -->") == 1 and "| target | result | met |" in text and "target:" in out
    # every row's numbers as JSON: the source of the figures in the README and RESULTS.md
    rows = json.loads((tmp_path / "results" / "lm.json").read_text())["rows"]
    keys = ("name", "method", "k", "samples", "alpha", "temperature", "steps", "bytes_per_position",
            "perplexity_per_seed", "perplexity_mean", "kl_to_teacher_mean", "ece_mean")
    assert all(key in r for r in rows for key in keys)
    assert {r["method"] for r in rows} == {"scratch", "online", "topk", "sample", "topk-tail-samples"}
    assert all(r["kl_to_teacher_mean"] > 0 for r in rows)
    online = next(r for r in rows if r["method"] == "online")
    assert online["bytes_per_position"] is None and all(r["bytes_per_position"] > 0 for r in rows if r["method"] in
                                                        ("topk", "sample", "topk-tail-samples"))
