"""Stage one end to end: `distill generate-labels` from the CLI, resume, torchrun, job arrays."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.models import ModelConfig, load_model
from distill.storage import native, open_store, topk_labels

REPO = Path(__file__).resolve().parents[2]
MNIST = "mnist1d:num_samples=600"  # 480 train examples
MLP = "mlp:hidden=32"
FIELDS = ("offsets", "topk_ids", "topk_logprobs", "tail_logprob", "tempered_lse", "counts", "token_index")


def run(*args, ok=True):
    """``distill generate-labels ARGS`` here, on the CPU unless ARGS name a device (auto would take a GPU)."""
    device = [] if "--device" in args else ["--device", "cpu"]
    result = CliRunner().invoke(cli, ["generate-labels", "--no-progress", *device, *map(str, args)])
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


def decoded(url):
    labels = open_store(str(url)).read_all()
    return {f: getattr(labels, f) for f in FIELDS}


def assert_same_store(a, b):
    da, db = decoded(a), decoded(b)
    for f in FIELDS:
        if da[f] is None or db[f] is None:
            assert da[f] is None and db[f] is None, f
        else:
            assert torch.equal(da[f], db[f]), f"{f} differs"


def commit_records(store):
    return sorted((Path(store) / "shards").glob("*.commit.json"))


def test_classification_topk_matches_the_teacher(tmp_path):
    out = tmp_path / "store"
    run("--teacher", MLP, "--data", MNIST, "--out", out, "--k", 4, "--temperature", 2, "--value-encoding", "lossless",
        "--examples-per-shard", 100, "--batch-size", 64)
    reader = open_store(str(out))
    assert reader.complete and reader.spec.num_shards == 5 and reader.num_positions == 480

    teacher = load_model(ModelConfig(MLP))
    data = load_data(DataConfig(MNIST))
    assert reader.spec.teacher_fingerprint == teacher.fingerprint
    assert reader.spec.dataset_fingerprint == data.fingerprint()
    with torch.inference_mode():
        logits = teacher.logits(data.collate([data[i] for i in range(len(data))]))
    want = topk_labels(logits, 4, (2.0,))
    got = reader.read_all()
    assert torch.equal(got.topk_ids, want.topk_ids)
    torch.testing.assert_close(got.topk_logprobs, want.topk_logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.tail_logprob, want.tail_logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.tempered_lse, want.tempered_lse, rtol=0, atol=1e-5)


def _text_file(path, n_chars=3000):
    g = torch.Generator().manual_seed(0)
    words = ["the", "teacher", "student", "distils", "a", "store", "of", "labels", "and", "trains", "\n"]
    picks = torch.randint(len(words), (n_chars // 5,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in picks))
    return path


GPT = "gpt:d_model=32,n_layers=1,n_heads=2,max_len=64"


def test_causal_lm_stores_one_position_per_token(tmp_path):
    text = _text_file(tmp_path / "corpus.txt")
    out = tmp_path / "store"
    run("--teacher", GPT, "--data", text, "--tokenizer", "bytes", "--seq-len", 48, "--out", out, "--k", 8,
        "--value-encoding", "lossless", "--batch-size", 8, "--examples-per-shard", 16)
    reader = open_store(str(out))
    data = load_data(DataConfig(str(text), task="causal-lm", tokenizer="bytes", seq_len=48))
    lengths = [int(data[i]["input_ids"].numel()) for i in range(len(data))]
    assert reader.complete and reader.spec.vocab_size == 256 and reader.spec.task == "causal-lm"
    got = reader.read_all()
    assert torch.equal(got.offsets[1:] - got.offsets[:-1], torch.tensor(lengths))

    teacher = load_model(ModelConfig(GPT))
    for e in (0, len(data) - 1):  # each example alone: no padding, position t predicts token t+1
        with torch.inference_mode():
            logits = teacher.logits(data.collate([data[e]]))[0]  # (L, V)
        want = topk_labels(logits, 8)
        mine = got.example(e)
        assert torch.equal(mine.topk_ids, want.topk_ids)
        torch.testing.assert_close(mine.topk_logprobs, want.topk_logprobs, rtol=0, atol=1e-5)


def test_ignored_positions_are_not_stored(tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
            {"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "store"
    run("--teacher", GPT, "--data", path, "--out", out, "--k", 4)
    got = open_store(str(out)).read_all()
    # labels[t + 1] != -100 keeps position t: tokens 1, 2, 3 of the first row; 0, 1 of the second
    assert got.offsets.tolist() == [0, 3, 5]
    assert got.token_index.tolist() == [1, 2, 3, 0, 1]


def test_sampled_labels_are_seeded(tmp_path):
    args = ["--teacher", MLP, "--data", MNIST, "--method", "sample", "--samples", 12, "--examples-per-shard", 200]
    run(*args, "--out", tmp_path / "a")
    run(*args, "--out", tmp_path / "b")
    assert_same_store(tmp_path / "a", tmp_path / "b")
    got = open_store(str(tmp_path / "a")).read_all()
    assert got.counts.sum(1).eq(12).all()
    run(*args, "--seed", 1, "--out", tmp_path / "c")
    assert not torch.equal(open_store(str(tmp_path / "c")).read_all().topk_ids, got.topk_ids)


def test_tail_draws_are_seeded_drawn_outside_the_top_k_and_resume_alike(tmp_path):
    """--tail-samples: systematic draws from each position's tail; a shard redone draws the same ids."""
    text = _text_file(tmp_path / "corpus.txt")
    args = ["--teacher", GPT, "--data", text, "--tokenizer", "bytes", "--seq-len", 48, "--k", 8, "--tail-samples", 6,
            "--batch-size", 8, "--examples-per-shard", 16]
    run(*args, "--out", tmp_path / "a")
    reader = open_store(str(tmp_path / "a"))
    assert reader.spec.tail_samples == 6 and reader.spec.extra["sampling"] == "systematic"
    got = reader.read_all()
    assert got.tail_counts.sum(1).eq(6).all()
    live = got.tail_counts > 0
    for ids, tail_ids, keep in zip(got.topk_ids, got.tail_ids, live):
        assert not set(tail_ids[keep].tolist()) & set(ids.tolist())
    shutil.rmtree(tmp_path / "a" / "shards" / "000001")
    (tmp_path / "a" / "shards" / "000001.commit.json").unlink()
    run(*args, "--out", tmp_path / "a")  # the shard is redone: the same draws
    redone = open_store(str(tmp_path / "a")).read_all()
    assert torch.equal(redone.tail_ids, got.tail_ids) and torch.equal(redone.tail_counts, got.tail_counts)
    summary = json.loads(CliRunner().invoke(cli, ["inspect", str(tmp_path / "a"), "--json"]).output)
    assert summary["tail_samples"] == 6 and summary["sampling"] == "systematic" and summary["unique_ids_mean"] > 1
    with pytest.raises(AssertionError, match="there is no tail|holds all 256"):
        run(*args[:-4], "--k", 256, "--out", tmp_path / "b")


@pytest.mark.skipif(native.library() is None, reason="no C compiler: only the torch reduction runs here")
def test_the_compiled_reduction_writes_the_store_the_torch_path_writes(tmp_path, monkeypatch):
    """A vocabulary large enough for storage/reduce.c (8,192 ids, k = 8, 16 tail draws): the same ids, draws and
    counts as with DISTILL_NATIVE=0, and log-probs, tails and normalisers within float32 rounding."""
    text = _text_file(tmp_path / "corpus.txt")
    args = ["--teacher", "gpt:vocab_size=8192,d_model=32,n_layers=1,n_heads=2,max_len=64", "--data", text,
            "--tokenizer", "bytes", "--seq-len", 48, "--k", 8, "--tail-samples", 16, "--temperature", 2,
            "--value-encoding", "lossless", "--batch-size", 8, "--examples-per-shard", 16]
    run(*args, "--out", tmp_path / "compiled")
    monkeypatch.setenv("DISTILL_NATIVE", "0")
    run(*args, "--out", tmp_path / "torch")
    a, b = decoded(tmp_path / "compiled"), decoded(tmp_path / "torch")
    for f in ("offsets", "topk_ids"):
        assert torch.equal(a[f], b[f]), f
    for f in ("topk_logprobs", "tail_logprob", "tempered_lse"):
        torch.testing.assert_close(a[f], b[f], rtol=0, atol=2e-6)
    assert not torch.equal(a["tempered_lse"], b["tempered_lse"])  # two paths ran: their float32 rounding differs
    got, want = (open_store(str(tmp_path / name)).read_all() for name in ("compiled", "torch"))
    assert torch.equal(got.tail_ids, want.tail_ids) and torch.equal(got.tail_counts, want.tail_counts)


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "store"
    run("--teacher", MLP, "--data", MNIST, "--out", out, "--k", 4)
    records = {p: p.stat().st_mtime_ns for p in commit_records(out)}
    run("--teacher", MLP, "--data", MNIST, "--out", out, "--k", 4)  # the same command: nothing to redo
    assert {p: p.stat().st_mtime_ns for p in commit_records(out)} == records

    for flags, field in ((["--k", 5], "k=4"), (["--data", "mnist1d:num_samples=700"], "dataset_fingerprint"),
                         (["--teacher", "mlp:hidden=32,seed=1"], "teacher_fingerprint")):
        args = {"--teacher": MLP, "--data": MNIST, "--k": "4"}
        args.update(dict(zip(flags[::2], map(str, flags[1::2]))))
        result = run("--out", out, *[x for kv in args.items() for x in kv], ok=False)
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "\n" not in line and field in line and "--overwrite" in line
    run("--teacher", MLP, "--data", MNIST, "--out", out, "--k", 5, "--overwrite")
    assert open_store(str(out)).spec.k == 5


@pytest.mark.parametrize("args, message", [
    (["--k", "11"], "--k 11 is larger than the teacher's output size (10)"),
    (["--k", "0"], "--k must be at least 1"),
    (["--temperature", "0"], "temperatures must be finite and > 0"),
    (["--shard", "2/2"], "--shard '2/2' is not I/N"),
    (["--shard", "0/2", "--overwrite"], "--overwrite with --shard"),
    (["--teacher", "no_such_model_xyz"], "model spec"),
    (["--data", "no/such/file.parquet"], "data spec"),
])
def test_bad_flags_are_one_line_errors(tmp_path, args, message):
    base = {"--teacher": MLP, "--data": MNIST}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    extra = [a for a in args if a == "--overwrite"]
    argv = [x for kv in base.items() if kv[0] != "--overwrite" for x in kv] + extra
    result = run("--out", tmp_path / "store", *argv, ok=False)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "store" / "shards").exists()


def test_config_file_with_flags_overriding(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text(f'[generate-labels]\nteacher = "{MLP}"\ndata = "{MNIST}"\nk = 3\ntemperatures = [2.0, 4.0]\n')
    run("--config", job, "--out", tmp_path / "store", "--k", 2)
    spec = open_store(str(tmp_path / "store")).spec
    assert spec.k == 2 and spec.temperatures == (1.0, 2.0, 4.0)
    job.write_text('[generate-labels]\nbatch_sise = 3\n')
    result = run("--config", job, "--out", tmp_path / "other", ok=False)
    assert result.exit_code == 2 and "unknown key 'batch_sise'" in result.stderr


def test_progress_lines_when_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILL_LOG_EVERY", "0")
    result = CliRunner().invoke(cli, ["generate-labels", "--teacher", MLP, "--data", MNIST, "--out",
                                      str(tmp_path / "s"), "--batch-size", 100, "--device", "cpu"])
    assert result.exit_code == 0
    lines = [ln for ln in result.stderr.splitlines() if "positions/s" in ln]
    assert len(lines) >= 5 and "480/480 examples (100%)" in lines[-1]


def test_job_array_then_finalize(tmp_path):
    args = ["--teacher", MLP, "--data", MNIST, "--examples-per-shard", 60, "--k", 3]
    run(*args, "--out", tmp_path / "whole")
    out = tmp_path / "array"
    run(*args, "--out", out, "--shard", "1/2")
    assert not open_store(str(out)).complete
    result = run("--out", out, "--finalize", ok=False)
    assert result.exit_code == 2 and "4 shard(s) not complete (shards 0, 2, 4, 6 of 8)" in result.stderr
    assert f"--out {out}` with the same settings and no --shard" in result.stderr and result.stderr.count("\n") == 1
    run(*args, "--out", out, "--shard", "0/2")
    run("--out", out, "--finalize")
    assert open_store(str(out)).complete
    assert_same_store(tmp_path / "whole", out)


def test_each_shards_freed_buffers_are_given_back_once_it_is_committed(tmp_path, monkeypatch):
    from distill.stages import generate

    out, seen = tmp_path / "s", []
    monkeypatch.setattr(generate, "release_free_memory", lambda: seen.append(len(commit_records(out))))
    run("--teacher", MLP, "--data", MNIST, "--out", out, "--examples-per-shard", 100, "--k", 3)
    assert seen == [1, 2, 3, 4, 5]  # once per shard, each after that shard's commit record is written


def _subprocess_env(extra_path=""):
    env = dict(os.environ, DISTILL_LOG_EVERY="3600", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, env.get("PYTHONPATH", "")) if p)
    return env


def test_torchrun_two_ranks_split_the_shards(tmp_path):
    args = ["--teacher", MLP, "--data", MNIST, "--examples-per-shard", 60, "--k", 3]  # with progress: the status lines
    run(*args, "--out", tmp_path / "whole")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "distill.cli", "generate-labels", *map(str, args), "--out", str(tmp_path / "ddp"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 for worker 0 of 2" in proc.stderr
    assert open_store(str(tmp_path / "ddp")).complete
    assert_same_store(tmp_path / "whole", tmp_path / "ddp")


def test_device_auto_without_cuda_is_the_cpu(tmp_path, monkeypatch):
    """Where torch sees no CUDA device, --device auto runs on the CPU in float32: the store --device cpu writes."""
    args = ["--teacher", MLP, "--data", MNIST, "--examples-per-shard", 240, "--k", 3]
    run(*args, "--out", tmp_path / "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run(*args, "--device", "auto", "--out", tmp_path / "auto")
    assert open_store(str(tmp_path / "auto")).spec.extra["compute_dtype"] == "float32"
    assert_same_store(tmp_path / "cpu", tmp_path / "auto")


@pytest.mark.slow  # ~15 s; the default suite kills stage one at each point in tests/reliability/test_kill_generate.py
def test_kill_9_then_rerun_resumes_to_the_same_store(tmp_path, test_modules):
    common = ["--data", MNIST, "--examples-per-shard", 40, "--batch-size", 10, "--k", 3]  # with progress: "N to do"
    run("--teacher", "slowteacher:fast_factory", *common, "--out", tmp_path / "whole")

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "distill.cli", "generate-labels", "--teacher", "slowteacher:factory",
           *map(str, common), "--out", str(out), "--device", "cpu"]
    proc = subprocess.Popen(cmd, env=_subprocess_env(test_modules), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(commit_records(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = {p.name: p.stat().st_mtime_ns for p in commit_records(out)}
    assert 3 <= len(done_before) < 12, "the run should be killed part-way"
    assert not open_store(str(out)).complete

    rerun = subprocess.run(cmd, env=_subprocess_env(test_modules), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{12 - len(done_before)} to do" in rerun.stderr
    kept = {p.name: p.stat().st_mtime_ns for p in commit_records(out) if p.name in done_before}
    assert kept == done_before, "complete shards must not be redone"
    assert_same_store(tmp_path / "whole", out)


def test_make_labels(tmp_path):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "distill").exists():
        pytest.skip("make labels runs the venv's distill script, which this interpreter does not have")
    proc = subprocess.run(
        ["make", "-s", "-o", "venv", "labels", f"VENV={venv}", f"TEACHER={MLP}", f"DATA={MNIST}",
         f"OUT={tmp_path / 'store'}", "ARGS=--k 3 --no-progress --device cpu"],
        cwd=REPO, capture_output=True, text=True, env=_subprocess_env(), timeout=240)
    assert proc.returncode == 0, proc.stderr
    assert open_store(str(tmp_path / "store")).spec.k == 3
    assert "shards" in proc.stdout and "complete" in proc.stdout


def test_hugging_face_causal_lm_with_its_own_tokenizer(tmp_path):
    from datahelp import SENTENCES, make_hf_tokenizer, write_jsonl
    from modelhelp import make_hf_causal_lm

    teacher = make_hf_causal_lm(tmp_path / "teacher", vocab=300)
    make_hf_tokenizer(teacher, vocab_size=300)  # beside the weights, as a hub download has it
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    out = tmp_path / "store"
    run("--teacher", teacher, "--data", data, "--out", out, "--k", 16, "--value-encoding", "lossless",
        "--seq-len", 32, "--batch-size", 3)
    reader = open_store(str(out))
    assert reader.complete and reader.spec.vocab_size == 300 and reader.spec.task == "causal-lm"

    model = load_model(ModelConfig(str(teacher)))
    examples = load_data(DataConfig(str(data), task="causal-lm", tokenizer=str(teacher), seq_len=32))
    assert reader.num_positions == int(examples.lengths.sum())
    got = reader.read_all()
    for e in range(len(examples)):
        with torch.inference_mode():
            want = topk_labels(model.logits(examples.collate([examples[e]]))[0], 16)
        assert torch.equal(got.example(e).topk_ids, want.topk_ids)
        torch.testing.assert_close(got.example(e).topk_logprobs, want.topk_logprobs, rtol=0, atol=1e-4)


def test_hugging_face_classifier_on_token_ids(tmp_path):
    from datahelp import write_parquet
    from modelhelp import make_hf_classifier

    teacher = make_hf_classifier(tmp_path / "teacher", vocab=300, num_labels=3)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 290, (int(n),), generator=g).tolist() for n in torch.randint(3, 12, (40,), generator=g)]
    data = write_parquet(tmp_path / "ids.parquet", {"input_ids": rows, "label": [i % 3 for i in range(40)]})
    out = tmp_path / "store"
    run("--teacher", teacher, "--data", data, "--out", out, "--value-encoding", "lossless", "--batch-size", 7)
    reader = open_store(str(out))
    assert reader.spec.k == 3 and reader.spec.task == "classification" and reader.num_positions == 40

    model = load_model(ModelConfig(str(teacher)))
    with torch.inference_mode():
        want = topk_labels(torch.cat([model.logits({"input_ids": torch.tensor([r]), "attention_mask": torch.ones(1, len(r), dtype=torch.int64)})
                                      for r in rows]), 3)
    torch.testing.assert_close(reader.read_all().topk_logprobs, want.topk_logprobs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("workload, examples", [pytest.param("lm-small", 4, marks=pytest.mark.slow),  # ~9 s
                                                ("classifier", 256)])
def test_generate_benchmark_prints_one_json_object_last(workload, examples):
    bench = REPO / "benchmarks" / "generate.py"
    proc = subprocess.run([sys.executable, str(bench), "--workload", workload, "--examples", str(examples),
                           "--repeats", "1", "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env=_subprocess_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])["workloads"][workload]
    assert r["teacher_only_positions_per_s"] > 0 and r["generate_positions_per_s"] > 0
    assert r["overhead_ratio"] == pytest.approx(r["generate_positions_per_s"] / r["teacher_only_positions_per_s"], rel=1e-3)
