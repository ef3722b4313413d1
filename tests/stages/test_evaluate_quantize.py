"""distill evaluate and distill quantize on tiny trained artefacts, checked against naive recomputations."""

import json
import math
import re
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from huggingface_hub import ModelCard
from torch import nn

from distill.cli import cli
from distill.errors import ConfigError
from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.modelfiles import pinned_device
from distill.pipeline.models import ModelConfig, load_model
from distill.stages.evaluate import retention_line
from distill.stages.quantize import QuantizeConfig
from distill.storage import open_store

MNIST = "mnist1d:num_samples=600"  # 480 train, 120 test examples
FAST = ["--repeats", 2, "--warmup", 1, "--min-timing-s", 0, "--throughput-batch", 32]  # timing is not what these tests check
CPU = ["--device", "cpu"]  # the references are computed on the CPU, in float32: so is what they check, GPU or not
GPT = "gpt:d_model=32,n_layers=1,n_heads=2,max_len=64"


def run(command, *args, ok=True):
    result = CliRunner().invoke(cli, [command, *map(str, args)])
    if ok and result.exit_code != 0:
        raise AssertionError(f"exit {result.exit_code}: {result.output}\n{result.stderr}") from result.exception
    return result


def report(*args) -> dict:
    return json.loads(run("evaluate", *args, *FAST, *CPU, "--json").output)


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


class NoLinear(nn.Module):
    """A classifier without Linear layers: nothing for quantize to do."""

    task, output_size = "classification", 10

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, inputs):
        return inputs[:, :10] * self.scale


def no_linear():
    return NoLinear()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """teacher (mlp) -> labels on train and test -> student (smaller mlp); a tiny gpt on text."""
    root = tmp_path_factory.mktemp("evaluate")
    train = ["--data", MNIST, "--workers", 0, "--no-progress", "--lr", "0.01", "--batch-size", 32]
    run("train-teacher", "--model", "mlp:hidden=128", "--out", root / "teacher", "--steps", 60, *train)
    for split in ("train", "test"):
        run("generate-labels", "--teacher", root / "teacher", "--data", MNIST, "--split", split,
            "--out", root / f"labels-{split}", "--no-progress")
    run("train-student", "--labels", root / "labels-train", "--student", "mlp:hidden=16", "--out", root / "student",
        "--steps", 30, *train)
    text = root / "corpus.txt"
    g = torch.Generator().manual_seed(0)
    words = ["offline", "labels", "teach", "a", "small", "student", "\n"]
    text.write_text(" ".join(words[i] for i in torch.randint(len(words), (600,), generator=g).tolist()))
    run("train-teacher", "--model", GPT, "--data", text, "--tokenizer", "bytes", "--seq-len", 64, "--out", root / "gpt",
        "--steps", 10, "--batch-size", 8, "--workers", 0, "--no-progress", "--lr", "0.01")
    return root


def test_evaluate_reports_the_student_against_its_teacher(runs):
    r = report("--model", runs / "student", "--teacher", runs / "teacher", "--data", MNIST)
    data = load_data(DataConfig(MNIST, split="test"))
    batch = data.collate([data[i] for i in range(len(data))])
    student, teacher = load_model(ModelConfig(str(runs / "student"))), load_model(ModelConfig(str(runs / "teacher")))
    with torch.no_grad():
        s_logits, t_logits = student.module(batch["inputs"]).double(), teacher.module(batch["inputs"]).double()
    labels = batch["labels"]
    assert r["metric"] == "accuracy" and 0 <= r["value"] <= 1 and r["positions"] == len(data) == 120
    assert r["value"] == pytest.approx((s_logits.argmax(1) == labels).double().mean().item(), abs=1e-12)
    assert r["teacher_value"] == pytest.approx((t_logits.argmax(1) == labels).double().mean().item(), abs=1e-12)
    assert r["params"] == sum(p.numel() for p in student.module.parameters())
    assert r["teacher"]["params"] == sum(p.numel() for p in teacher.module.parameters())
    assert r["bytes"] == (runs / "student" / "model" / "model.safetensors").stat().st_size
    # agreement and the full-vocabulary KL(teacher || student), naively in float64
    assert r["agreement_with"] == "teacher"
    assert r["agreement"] == pytest.approx((s_logits.argmax(1) == t_logits.argmax(1)).double().mean().item())
    p_log, q_log = t_logits.log_softmax(1), s_logits.log_softmax(1)
    assert r["kl"] == pytest.approx((p_log.exp() * (p_log - q_log)).sum(1).mean().item(), rel=1e-4)
    # the comparison figures follow from the reported ones
    assert r["retention"] == pytest.approx(r["value"] / r["teacher_value"])
    assert r["size_ratio"] == pytest.approx(r["bytes"] / r["teacher"]["bytes"]) and r["size_ratio"] < 1
    assert r["speedup"] == pytest.approx(r["teacher"]["latency_ms"] / r["latency_ms"])
    assert r["latency_ms"] > 0 and r["throughput"] > 0 and r["throughput_unit"] == "examples/s"
    # the student's model card (model/README.md) reads back and now holds this evaluation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        card = ModelCard.load(runs / "student" / "model" / "README.md")
    assert card.data.tags == ["distillation", "classification"] and card.data.library_name == "pytorch"
    assert card.data.license == "unknown" and card.data.base_model is None  # a built-in teacher declares none
    assert "- loss: `kl`" in card.text and "- steps: 30" in card.text and "method topk, k " in card.text
    assert retention_line(r) in card.text and card.text.count("student keeps") == 1


def test_human_output_is_a_table_and_the_retention_line(runs):
    out = run("evaluate", "--model", runs / "student", "--teacher", runs / "teacher", "--data", MNIST,
              *FAST, *CPU).output
    lines = out.splitlines()
    assert lines[0].split() == ["model", "accuracy", "params", "size", "latency", "(1", "thread)", "throughput", "(1",
                                "thread)"]  # timed on one intra-op thread by default
    assert lines[1].startswith("teacher ") and lines[2].startswith("student ")
    assert re.fullmatch(r"student keeps \d+\.\d% of the teacher's accuracy, is \d+\.\d% smaller and "
                        r"\d+\.\d× (faster|slower)", lines[3]), lines[3]
    assert re.fullmatch(r"expected calibration error of the top-1 \(15 bins\): 0\.\d{4} \(teacher 0\.\d{4}\)", lines[4]), lines[4]
    assert lines[5].startswith("agreement with the teacher: top-1 ")
    made_up = {"retention": 0.971, "metric": "perplexity", "size_ratio": 0.15, "speedup": 3.21}
    # perplexity: lower is better, and the line says the student's as a multiple of the teacher's
    assert retention_line(made_up) == "student has perplexity 1.03× the teacher's, is 85.0% smaller and 3.2× faster"
    assert retention_line({**made_up, "metric": "accuracy"}, name="int8 student") == (
        "int8 student keeps 97.1% of the teacher's accuracy, is 85.0% smaller and 3.2× faster")
    assert retention_line({**made_up, "size_ratio": 1.2, "speedup": 0.5}).endswith("is 20.0% larger and 2.0× slower")


def test_models_compared_together_are_timed_once_with_one_set_of_figures(runs):
    from distill.stages.evaluate import EvaluateConfig, evaluate_models

    fast = dict(data=MNIST, device="cpu", warmup=1, repeats=2, throughput_batch=32, min_timing_s=0)
    teacher = str(runs / "teacher")
    alone, student, itself = evaluate_models([
        EvaluateConfig(model=teacher, **fast), EvaluateConfig(model=str(runs / "student"), teacher=teacher, **fast),
        EvaluateConfig(model=teacher + "/", teacher=teacher, **fast)])  # one path spelled two ways: one model
    for figure in ("latency_ms", "throughput"):  # the teacher's row, as alone and as each one's teacher
        assert alone[figure] == student["teacher"][figure] == itself[figure] == itself["teacher"][figure]
    assert student["speedup"] == alone["latency_ms"] / student["latency_ms"] and itself["speedup"] == 1.0
    assert student["value"] != alone["value"] and student["teacher_value"] == alone["value"]


def test_timing_runs_on_the_timing_threads_and_gives_the_process_its_threads_back(runs, monkeypatch):
    import distill.stages.evaluate as evaluate
    from distill.stages.evaluate import EvaluateConfig, evaluate_model

    seen, timed, tuned = [], evaluate.time_together, []
    monkeypatch.setattr(evaluate, "time_together", lambda *a, **k: seen.append(torch.get_num_threads()) or timed(*a, **k))
    monkeypatch.setattr(evaluate, "tune_allocator", lambda: tuned.append(len(seen)))  # before each timing
    fast = dict(data=MNIST, device="cpu", warmup=1, repeats=2, throughput_batch=32, min_timing_s=0)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        one = evaluate_model(EvaluateConfig(model=str(runs / "student"), **fast))
        every = evaluate_model(EvaluateConfig(model=str(runs / "student"), timing_threads=0, **fast))
        assert seen == [1, 2] and torch.get_num_threads() == 2 and tuned == [0, 1]
        assert one["timing_threads"] == 1 and every["timing_threads"] == 2
    finally:
        torch.set_num_threads(before)


def test_the_teacher_against_itself_agrees_fully(runs):
    r = report("--model", runs / "teacher", "--teacher", runs / "teacher", "--data", MNIST)
    assert r["agreement"] == 1.0 and abs(r["kl"]) < 1e-6
    assert r["retention"] == 1.0 and r["size_ratio"] == 1.0 and r["value"] == r["teacher_value"]
    stored = report("--model", runs / "teacher", "--labels", runs / "labels-test", "--data", MNIST)
    assert stored["agreement_with"] == "labels" and "retention" not in stored
    assert stored["agreement"] > 0.99 and 0 <= stored["kl"] < 1e-3  # the store's values are lossy (sqrt encoding)


def test_agreement_with_a_store_matches_a_naive_bucket_kl(runs):
    r = report("--model", runs / "student", "--labels", runs / "labels-test", "--data", MNIST)
    labels = open_store(str(runs / "labels-test")).read_all()
    data = load_data(DataConfig(MNIST, split="test"))
    with torch.no_grad():
        q = load_model(ModelConfig(str(runs / "student"))).module(data.collate([data[i] for i in range(len(data))])["inputs"])
    q = q.double().softmax(1)  # (P, V)
    ids, p_lp, p_tail = labels.topk_ids, labels.topk_logprobs.double(), labels.tail_logprob.double()
    top1 = ids.gather(1, p_lp.argmax(1, keepdim=True))[:, 0]
    assert r["agreement"] == pytest.approx((q.argmax(1) == top1).double().mean().item())
    q_k = q.gather(1, ids)  # (P, K)
    q_tail = (1 - q_k.sum(1)).clamp_min(1e-300)
    p_k = p_lp.exp()
    tail_term = torch.where(p_tail > -math.inf, p_tail.exp() * (p_tail - q_tail.log()), 0.0)
    kl = (p_k * (p_lp - q_k.log())).sum(1) + tail_term
    assert r["kl"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-6)


def test_perplexity_is_exp_of_the_next_token_cross_entropy(runs):
    common = ["--data", runs / "corpus.txt", "--tokenizer", "bytes", "--seq-len", 64, "--split", "train"]
    r = report("--model", runs / "gpt", "--teacher", runs / "gpt", *common)
    model = load_model(ModelConfig(str(runs / "gpt")))
    data = load_data(DataConfig(str(runs / "corpus.txt"), tokenizer="bytes", seq_len=64))
    losses = []
    with torch.no_grad():
        for i in range(len(data)):
            ids = data[i]["input_ids"]  # (L,)
            logits = model.module(ids[None])[0].double()  # (L, V)
            losses.append(F.cross_entropy(logits[:-1], ids[1:], reduction="none"))
    nll = torch.cat(losses)
    assert r["metric"] == "perplexity" and r["positions"] == len(nll)
    assert r["value"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    assert r["retention"] == 1.0 and r["throughput_unit"] == "tokens/s"
    assert r["params"] == sum(p.numel() for p in model.module.parameters())
    # quantized, it still loads, keeps its perplexity within a few percent, and sees every length
    q = json.loads(run("quantize", "--model", runs / "gpt", "--out", runs / "gpt-q", "--json").output)
    assert q["export"] == "script" and q["quantized_linears"] == 5
    rq = report("--model", runs / "gpt-q", "--teacher", runs / "gpt", *common)
    assert rq["value"] == pytest.approx(r["value"], rel=0.05) and rq["agreement"] > 0.9
    # perplexity retention is teacher / student: lower is better
    assert rq["retention"] == pytest.approx(rq["teacher_value"] / rq["value"])


def test_a_store_made_from_other_data_is_refused(runs):
    result = run("evaluate", "--model", runs / "student", "--labels", runs / "labels-train", "--data", MNIST, ok=False)
    one_line_error(result, "was made from other data")
    result = run("evaluate", "--model", runs / "student", "--labels", runs / "labels-test", "--teacher",
                 runs / "teacher", "--data", MNIST, ok=False)
    one_line_error(result, "pass --teacher or --labels, not both")


@pytest.mark.parametrize("method", ["dynamic-int8", "weight-only-int8"])
def test_quantize_shrinks_the_model_and_evaluate_accepts_it(runs, method):
    out = runs / f"teacher-{method}"
    q = json.loads(run("quantize", "--model", runs / "teacher", "--out", out, "--method", method, "--json").output)
    saved = json.loads((out / "model" / "model.json").read_text())
    assert saved["kind"] == "torchscript" and saved["method"] == method and saved["file"] == "model.pt"
    assert q["bytes_after"] == (out / "model" / "model.pt").stat().st_size
    assert q["bytes_after"] < q["bytes_before"] == (runs / "teacher" / "model" / "model.safetensors").stat().st_size
    loaded = load_model(ModelConfig(str(out)))
    assert loaded.task == "classification" and loaded.output_size == 10 and loaded.describe["kind"] == "torchscript"
    r = report("--model", out, "--teacher", runs / "teacher", "--data", MNIST)
    assert abs(r["value"] - r["teacher_value"]) <= 0.05 and r["agreement"] >= 0.9
    assert r["params"] == r["teacher"]["params"] and r["bytes"] == q["bytes_after"] and r["size_ratio"] < 1
    card = (out / "model" / "README.md").read_text()  # the teacher's card, carried over, with its results
    assert f"--method {method}" in card and "- loss: `cross-entropy on the hard labels`" in card
    assert "quantized" in ModelCard.load(out / "model" / "README.md").data.tags and retention_line(r) in card
    # rerunning the same command redoes it; another method into the same directory needs --overwrite
    run("quantize", "--model", runs / "teacher", "--out", out, "--method", method)
    other = "weight-only-int8" if method == "dynamic-int8" else "dynamic-int8"
    one_line_error(run("quantize", "--model", runs / "teacher", "--out", out, "--method", other, ok=False),
                   "holds another quantized model")
    one_line_error(run("quantize", "--model", out, "--out", runs / "again", ok=False), "is a TorchScript model")


def test_bad_inputs_are_one_line_errors(runs, tmp_path, test_modules):
    missing = tmp_path / "no-such-run"
    one_line_error(run("evaluate", "--model", missing, "--data", MNIST, ok=False), "no such file or directory")
    one_line_error(run("quantize", "--model", missing, "--out", tmp_path / "q", ok=False), "no such run directory")
    one_line_error(run("quantize", "--model", runs / "student", "--out", tmp_path / "q", "--method", "int4", ok=False),
                   "Invalid value for '--method': 'int4' is not one of 'dynamic-int8', 'weight-only-int8'")
    one_line_error(run("quantize", "--model", "test_evaluate_quantize:no_linear", "--out", tmp_path / "q", ok=False),
                   "has no nn.Linear layers")
    one_line_error(run("quantize", "--model", runs / "student", "--out", runs / "teacher", ok=False),
                   "is not a quantize output")
    assert not (tmp_path / "q").exists()


# --- devices: a traced archive runs on the device it was traced on -------------------------------

@pytest.fixture(scope="module")
def hf_quantized(tmp_path_factory):
    """A tiny HF causal LM (quantize traces it), its text, and its weight-only-int8 archive traced on the CPU."""
    from datahelp import SENTENCES, make_hf_tokenizer, write_jsonl
    from modelhelp import make_hf_causal_lm

    root = tmp_path_factory.mktemp("hf-quantize")
    student = make_hf_causal_lm(root / "student", vocab=300)
    make_hf_tokenizer(student, vocab_size=300)
    data = write_jsonl(root / "text.jsonl", [{"text": s} for s in SENTENCES * 3])
    text = ["--data", data, "--tokenizer", student, "--seq-len", 32, "--split", "train"]
    summary = json.loads(run("quantize", "--model", student, "--out", root / "q", "--method", "weight-only-int8",
                             *text[:6], *CPU, "--json").output)
    return SimpleNamespace(student=student, out=root / "q", text=text, summary=summary)


def fake_cuda(monkeypatch, available: bool) -> None:
    """torch.cuda as a machine with one GPU (or none) reports it; nothing here runs on it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(available))


def test_a_traced_hf_student_is_pinned_to_the_cpu_and_evaluate_auto_runs_it_there(hf_quantized, monkeypatch):
    h = hf_quantized
    saved = json.loads((h.out / "model" / "model.json").read_text())
    assert h.summary["export"] == "trace" and h.summary["traced_on"] == saved["traced_on"] == "cpu"
    pin = pinned_device(str(h.out))
    assert pin.device == "cpu" and pinned_device(str(h.out / "model")) == pin
    assert pinned_device(str(h.out / "model" / "model.pt")) == pin and pinned_device(str(h.student)) is None
    source = report("--model", h.student, *h.text)
    fake_cuda(monkeypatch, True)
    r = json.loads(run("evaluate", "--model", h.out, *h.text, *FAST, "--json").output)  # --device auto
    assert r["device"] == "cpu" and r["value"] == pytest.approx(source["value"], rel=0.05)
    result = run("evaluate", "--model", h.out, *h.text, "--device", "cuda", ok=False)
    one_line_error(result, "runs on cpu only (it was traced on the CPU")
    assert "pass --device cpu (or auto), or re-quantize it with --device cuda" in result.stderr


def test_a_trace_made_for_a_gpu_runs_there_only(hf_quantized, tmp_path, monkeypatch):
    h = hf_quantized
    on_gpu = tmp_path / "q-cuda"  # what quantize --device cuda writes on a GPU machine, but for the archive's code
    shutil.copytree(h.out, on_gpu)
    saved = json.loads((on_gpu / "model" / "model.json").read_text())
    (on_gpu / "model" / "model.json").write_text(json.dumps({**saved, "traced_on": "cuda:0"}))
    assert pinned_device(str(on_gpu)).device == "cuda:0"
    fake_cuda(monkeypatch, False)
    result = run("evaluate", "--model", on_gpu, *h.text, ok=False)
    one_line_error(result, "runs on cuda:0 only")
    assert "this machine has no cuda:0: re-quantize it with --device cpu" in result.stderr
    fake_cuda(monkeypatch, True)
    one_line_error(run("evaluate", "--model", on_gpu, *h.text, *CPU, ok=False), "pass --device cuda:0 (or auto)")
    one_line_error(run("evaluate", "--model", on_gpu, "--teacher", h.out, *h.text, ok=False), "evaluate them apart")


def test_a_scripted_archive_runs_anywhere_and_an_older_model_json_still_loads(runs, hf_quantized, tmp_path):
    out = tmp_path / "mlp-q"
    q = json.loads(run("quantize", "--model", runs / "student", "--out", out, "--method", "weight-only-int8",
                       "--json").output)
    assert q["export"] == "script" and q["traced_on"] is None
    assert json.loads((out / "model" / "model.json").read_text())["traced_on"] is None
    assert pinned_device(str(out)) is None
    # model.json from before traced_on: its traces were all made on the CPU, and a script runs anywhere
    for made, pinned in ((hf_quantized.out, "cpu"), (out, None)):
        old = tmp_path / f"old-{made.name}"
        shutil.copytree(made, old)
        saved = json.loads((old / "model" / "model.json").read_text())
        del saved["traced_on"]
        (old / "model" / "model.json").write_text(json.dumps(saved))
        assert getattr(pinned_device(str(old)), "device", None) == pinned
        assert load_model(ModelConfig(str(old))).describe["kind"] == "torchscript"


def test_dynamic_int8_is_for_the_cpu_only(runs, tmp_path):
    result = run("quantize", "--model", runs / "student", "--out", tmp_path / "q", "--method", "dynamic-int8",
                 "--device", "cuda", ok=False)
    one_line_error(result, "dynamic-int8 runs on the CPU only")
    assert "use --method weight-only-int8 for a GPU, or --device cpu" in result.stderr and not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="dynamic-int8 runs on the CPU only"):
        QuantizeConfig(model=str(runs / "student"), out=str(tmp_path / "q"), method="dynamic-int8", device="cuda:1")
    q = json.loads(run("quantize", "--model", runs / "student", "--out", tmp_path / "q", "--method", "dynamic-int8",
                       *CPU, "--json").output)
    pin = pinned_device(str(tmp_path / "q"))
    assert q["traced_on"] is None and pin.device == "cpu" and "dynamic-int8" in pin.why
