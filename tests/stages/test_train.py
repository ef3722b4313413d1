"""Stage two end to end: train-teacher, train-student, resume after kill -9, refusals, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from distill.pipeline.models import ModelConfig, load_model
from clihelp import metrics, run

REPO = Path(__file__).resolve().parents[2]
MNIST = "mnist1d:num_samples=600"  # 480 train, 120 test examples




@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A teacher trained briefly with train-teacher, and its labels on the training split."""
    root = tmp_path_factory.mktemp("stage2")
    run("train-teacher", "--model", "mlp:hidden=64", "--data", MNIST, "--out", root / "teacher", "--epochs", 6, "--lr", "0.01",
        "--batch-size", 32, "--workers", 0, "--eval-split", "test")
    run("generate-labels", "--teacher", root / "teacher", "--data", MNIST, "--out", root / "labels",
        "--examples-per-shard", 100)
    return root


def test_teacher_then_student_end_to_end(labelled, tmp_path):
    teacher = metrics(labelled / "teacher")
    assert teacher[-1]["eval"]["accuracy"] > 0.2 and any("ce" in m for m in teacher)
    out = tmp_path / "student"
    result = run("train-student", "--labels", labelled / "labels", "--student", "mlp:hidden=16", "--data", MNIST,
                 "--out", out, "--epochs", 2, "--eval-split", "test", "--eval-every", 10, "--log-every", 5, "--json")
    summary = json.loads(result.output.strip().splitlines()[-1])
    lines = metrics(out)
    train_lines = [m for m in lines if "loss" in m]
    assert train_lines and all(k in train_lines[0] for k in ("step", "loss", "soft", "ce", "lr", "examples_per_s"))
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in train_lines)
    assert [m["step"] for m in lines if "eval" in m][:2] == [10, 20]
    assert summary["metrics"]["eval"]["accuracy"] > 0.1
    # the saved student loads as a model spec: the run directory itself
    student = load_model(ModelConfig(str(out)))
    assert student.output_size == 10 and (out / "model" / "model.json").exists()


def test_causal_lm_student_on_text(tmp_path):
    text = tmp_path / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    words = ["offline", "labels", "teach", "a", "small", "student", "\n"]
    text.write_text(" ".join(words[i] for i in torch.randint(len(words), (900,), generator=g).tolist()))
    common = ["--data", text, "--tokenizer", "bytes", "--seq-len", 64]
    run("generate-labels", "--teacher", "gpt:d_model=32,n_layers=1,n_heads=2,max_len=64", *common, "--out",
        tmp_path / "labels", "--k", 16, "--tail-samples", 0)
    run("train-student", "--labels", tmp_path / "labels", "--student", "gpt:d_model=16,n_layers=1,n_heads=2,max_len=64",
        *common, "--out", tmp_path / "student", "--steps", 12, "--batch-size", 8, "--eval-split", "train",
        "--workers", 0, "--loss", "jsd")
    last = metrics(tmp_path / "student")[-1]["eval"]
    assert 1 < last["perplexity"] < 300 and last["positions"] > 0
    # a store with tail draws: the defaults for a causal LM train on them; other divergences need --no-tail-samples
    run("generate-labels", "--teacher", "gpt:d_model=32,n_layers=1,n_heads=2,max_len=64", *common, "--out",
        tmp_path / "draws", "--k", 8, "--tail-samples", 8)
    student = ["--student", "gpt:d_model=16,n_layers=1,n_heads=2,max_len=64", *common, "--steps", 4, "--batch-size", 8,
               "--workers", 0]
    run("train-student", "--labels", tmp_path / "draws", *student, "--out", tmp_path / "s-draws")
    saved = json.loads((tmp_path / "s-draws" / "config.json").read_text())
    assert saved["temperature"] == 1.0 and saved["tail_samples"] is True and saved["alpha"] is not None
    refused = run("train-student", "--labels", tmp_path / "draws", *student, "--out", tmp_path / "s-jsd", "--loss", "jsd",
                  ok=False)
    assert refused.exit_code == 2 and "--no-tail-samples" in refused.stderr
    assert not (tmp_path / "s-jsd").exists()  # refused before anything is written
    run("train-student", "--labels", tmp_path / "draws", *student, "--out", tmp_path / "s-jsd", "--loss", "jsd",
        "--no-tail-samples")


@pytest.mark.parametrize("args, message", [
    (["--data", "mnist1d:num_samples=700"], "was made from other data"),
    (["--student", "mlp:num_classes=7"], "the student outputs 7 values but the store's vocabulary is 10"),
    (["--temperature", "3"], "temperature 3 is not in the store (it holds 1, 2)"),
    (["--alpha", "1.5"], "--alpha must be in [0, 1]"),
    (["--labels", "no/such/store"], "no store at no/such/store"),
])
def test_refusals_are_one_line(labelled, tmp_path, args, message):
    base = {"--labels": str(labelled / "labels"), "--student": "mlp:hidden=16", "--data": MNIST}
    base.update(dict(zip(args[::2], args[1::2])))
    result = run("train-student", "--out", tmp_path / "s", *[x for kv in base.items() for x in kv], ok=False)
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "s" / "model").exists()


def test_a_run_directory_with_other_settings_is_refused(labelled, tmp_path):
    args = ["--labels", labelled / "labels", "--student", "mlp:hidden=16", "--data", MNIST, "--out", tmp_path / "s",
            "--steps", 3, "--workers", 0]
    run("train-student", *args)
    result = run("train-student", *args[:-4], "--steps", 3, "--workers", 0, "--lr", "0.1", ok=False)
    assert result.exit_code == 2 and "holds a run with lr=0.001, not 0.1" in result.stderr
    run("train-student", *args[:-4], "--steps", 3, "--workers", 0, "--lr", "0.1", "--overwrite")


def test_dataloader_workers_default_to_none_on_a_cpu_and_one_on_a_gpu(labelled, tmp_path):
    """On a CPU the batches are read in the training process (its threads already use every core); the run
    records the number it used, and a resumed run may change it."""
    from distill.pipeline.trainer import loader_workers

    assert loader_workers(None, torch.device("cpu")) == 0 and loader_workers(None, torch.device("cuda", 0)) == 1
    assert loader_workers(2, torch.device("cpu")) == 2 and loader_workers(0, torch.device("cuda")) == 0
    args = ["--labels", labelled / "labels", "--student", "mlp:hidden=16", "--data", MNIST, "--out", tmp_path / "s",
            "--device", "cpu", "--checkpoint-every", 2]
    run("train-student", *args, "--steps", 2)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["workers"] == 0
    run("train-student", *args, "--steps", 4, "--workers", 1, "--overwrite")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["workers"] == 1
    assert metrics(tmp_path / "s")[-1]["step"] == 4


def test_training_on_a_cpu_tunes_the_allocator_first(labelled, tmp_path, monkeypatch):
    from distill.stages import train

    calls = []
    monkeypatch.setattr(train, "tune_allocator", lambda: calls.append("tuned"))
    run("train-teacher", "--model", "mlp:hidden=16", "--data", MNIST, "--out", tmp_path / "t", "--steps", 1,
        "--device", "cpu")
    assert calls == ["tuned"]


def test_a_run_made_before_a_setting_existed_resumes_at_that_settings_default(labelled, tmp_path):
    args = ["--labels", labelled / "labels", "--student", "mlp:hidden=16", "--data", MNIST, "--out", tmp_path / "s",
            "--workers", 0, "--checkpoint-every", 2]
    run("train-student", *args, "--steps", 2)
    saved = json.loads((tmp_path / "s" / "config.json").read_text())
    for newer in ("distributed", "lora_r", "gradient_checkpointing"):  # settings added after such a run was made
        saved.pop(newer)
    (tmp_path / "s" / "config.json").write_text(json.dumps(saved))
    run("train-student", *args, "--steps", 2)  # resumed (already done), not refused as another run
    result = run("train-student", *args, "--steps", 2, "--lr", "0.1", ok=False)  # an actual difference still is
    assert result.exit_code == 2 and "holds a run with lr=0.001, not 0.1" in result.stderr


def _env(extra=""):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH", "")) if p)
    return env


@pytest.mark.slow  # ~30 s; the default suite kills train-student in tests/reliability/test_kill_train.py (workers 0)
def test_kill_9_then_rerun_ends_with_the_same_weights(labelled, tmp_path, test_modules):
    args = ["train-student", "--labels", str(labelled / "labels"), "--student", "slowteacher:slow_student",
            "--data", MNIST, "--epochs", "2", "--batch-size", "16", "--checkpoint-every", "7", "--workers", "1",
            "--shuffle-buffer", "64", "--device", "cpu"]
    command = [sys.executable, "-m", "distill.cli", *args, "--no-progress", "--out"]
    whole = subprocess.run([*command, str(tmp_path / "whole")], env=_env(test_modules), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]  # same process settings (threads) as the killed run

    out = tmp_path / "killed"
    cmd = [*command, str(out)]
    proc = subprocess.Popen(cmd, env=_env(test_modules), stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:  # kill just after the 4th checkpoint (step 28 of the 30 in epoch 1)
        if latest.exists() and latest.read_text().strip() >= "step-00000028":
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "the run should have been killed before the end"

    rerun = subprocess.run(cmd, env=_env(test_modules), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == sorted(set(steps)), "metrics past the checkpoint are dropped on resume"


def test_torchrun_two_ranks_train_with_ddp(labelled, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "distill.cli",
           "train-student", "--labels", str(labelled / "labels"), "--student", "mlp:hidden=16", "--data", MNIST, "--data", MNIST,
           "--out", str(tmp_path / "ddp"), "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--workers", "0",
           "--no-progress", "--log-every", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [m["step"] for m in metrics(tmp_path / "ddp") if "loss" in m]
    # 5 shards of 96 examples, split 3/2 between the ranks: each epoch runs the smaller share's steps
    assert steps[-1] < 2 * 480 // 16 and load_model(ModelConfig(str(tmp_path / "ddp"))).output_size == 10


@pytest.mark.slow  # ~20 s; the default suite runs make labels (test_generate.py, tests/test_config_files.py)
def test_make_teacher_and_student(labelled, tmp_path):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "distill").exists():
        pytest.skip("make runs the venv's distill script, which this interpreter does not have")
    for target, args in (("teacher", f"MODEL=mlp:hidden=8 DATA={MNIST} OUT={tmp_path / 't'}"),
                         ("student", f"LABELS={labelled / 'labels'} STUDENT=mlp:hidden=8 DATA={MNIST} OUT={tmp_path / 's'}")):
        proc = subprocess.run(["make", "-s", "-o", "venv", target, f"VENV={venv}", *args.split(),
                               "ARGS=--steps 2 --no-progress --device cpu"],
                              cwd=REPO, capture_output=True, text=True, env=_env(), timeout=240)
        assert proc.returncode == 0, proc.stderr
        assert "model saved" in proc.stdout


def test_hugging_face_student_from_a_config(tmp_path):
    from datahelp import SENTENCES, make_hf_tokenizer, write_jsonl
    from modelhelp import make_hf_causal_lm
    from transformers import AutoModelForCausalLM, GPT2Config

    teacher = make_hf_causal_lm(tmp_path / "teacher", vocab=300, n_embd=32)
    make_hf_tokenizer(teacher, vocab_size=300)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "license": "mit"}))  # the student's card inherits it
    student = tmp_path / "student-config"
    GPT2Config(vocab_size=300, n_layer=1, n_embd=16, n_head=2, n_positions=64).save_pretrained(student)
    make_hf_tokenizer(student, vocab_size=300)  # the same tokenizer, beside the student's config
    data = write_jsonl(tmp_path / "text.jsonl", [{"text": s} for s in SENTENCES])
    run("generate-labels", "--teacher", teacher, "--data", data, "--out", tmp_path / "labels", "--k", 8, "--seq-len", 32)
    run("train-student", "--labels", tmp_path / "labels", "--student", student, "--data", data, "--seq-len", 32,
        "--out", tmp_path / "run", "--steps", 4, "--batch-size", 4, "--workers", 0)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")  # transformers loads it as it is
    card = ModelCard.load(tmp_path / "run" / "model" / "README.md")  # and the Hub reads its model card
    assert card.data.library_name == "transformers" and card.data.license == "mit"
    assert card.data.tags == ["distillation", "text-generation"] and "- steps: 4" in card.text
    assert saved.config.n_embd == 16 and (tmp_path / "run" / "model" / "config.json").exists()


def test_online_distillation_matches_the_store_loss_with_every_id_kept(labelled, tmp_path):
    """k = V with an empty tail is the full-logit KL: one step of online and offline distillation agree."""
    from distill.pipeline.losses import OnlineDistillationLoss, TopKDistillationLoss
    from distill.storage import topk_labels

    teacher = load_model(ModelConfig(str(labelled / "teacher")))
    batch = {"inputs": torch.randn(12, 40), "labels": torch.randint(0, 10, (12,))}
    student = torch.randn(12, 10, dtype=torch.float64)
    with torch.no_grad():
        full = teacher.logits(batch)
    for alpha, t in ((0.0, 1.0), (0.5, 2.0)):
        online = OnlineDistillationLoss(teacher, "classification", t, alpha)(student, batch, batch["labels"])
        offline = TopKDistillationLoss("kl", t, alpha)(student, topk_labels(full, 10, temperatures=(2.0,)),
                                                     batch["labels"])
        assert float(online["loss"]) == pytest.approx(float(offline["loss"]), rel=1e-5)


def test_no_tail_trains_and_is_recorded_in_the_run_config(labelled, tmp_path):
    out = tmp_path / "renorm"
    run("train-student", "--labels", labelled / "labels", "--student", "mlp:hidden=16", "--data", MNIST, "--out", out,
        "--steps", 3, "--workers", 0, "--no-tail", "--temperature", 1)
    assert json.loads((out / "config.json").read_text())["tail"] is False and (out / "model").is_dir()


def test_progress_lines_and_the_summary_show_the_loss(labelled, tmp_path):
    from click.testing import CliRunner

    from distill.cli import cli
    from distill.pipeline.progress import loss_text

    out = tmp_path / "student"
    result = CliRunner().invoke(cli, ["train-student", "--labels", str(labelled / "labels"), "--student", "mlp:hidden=16", "--data", MNIST,
                                      "--out", str(out), "--steps", 6, "--log-every", 2, "--alpha", "0.5",
                                      "--workers", "0", "--device", "cpu"], env={"DISTILL_LOG_EVERY": "0"})
    assert result.exit_code == 0, result.stderr
    last = [m for m in metrics(out) if "loss" in m][-1]
    expected = f"loss {last['loss']:.4f} (soft {last['soft']:.4f}, ce {last['ce']:.4f})"
    assert loss_text(last) == expected
    progress = [line for line in result.stderr.splitlines() if "/6 steps" in line]
    assert progress and "loss" not in progress[0] and progress[-1].endswith(", " + expected)  # none before step 2
    assert f"; final {expected}" in result.stdout
