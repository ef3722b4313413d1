"""Bigger students: gradient checkpointing, LoRA adapters (peft), live metrics (TensorBoard, wandb).

Each runs a tiny Hugging Face GPT-2 built from a config on bytes for a few steps on the CPU.
The peft, tensorboard and wandb tests are skipped with a reason when their extra is not installed.
"""

import importlib.util
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from distill.pipeline.models import ModelConfig, load_model
from clihelp import metrics, run

TEACHER = "gpt:d_model=32,n_layers=1,n_heads=2,max_len=32"




@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A bytes corpus, a Hugging Face GPT-2 student with weights (vocabulary 256), and a store of labels."""
    from modelhelp import make_hf_causal_lm

    root = tmp_path_factory.mktemp("bigger")
    g = torch.Generator().manual_seed(2)
    (root / "corpus.txt").write_text("".join(chr(97 + i) for i in torch.randint(12, (900,), generator=g).tolist()))
    make_hf_causal_lm(root / "student", vocab=256, n_embd=32)
    common = ["--data", root / "corpus.txt", "--tokenizer", "bytes", "--seq-len", 32]
    run("generate-labels", "--teacher", TEACHER, *common, "--out", root / "labels", "--k", 8, "--tail-samples", 0)
    return root, common


def teacher_run(root, common, out, *args):
    """train-teacher on the student directory: the same trainer as train-student, with no store to read."""
    return run("train-teacher", "--model", root / "student", *common, "--out", out, "--batch-size", 4, "--workers", 0,
               "--log-every", 1, *args)


# --- gradient checkpointing ------------------------------------------------------------------------


def test_gradient_checkpointing_trains_exactly_as_without(corpus, tmp_path):
    root, common = corpus
    teacher_run(root, common, tmp_path / "plain", "--steps", 2)
    teacher_run(root, common, tmp_path / "ckpt", "--steps", 2, "--gradient-checkpointing")
    plain, ckpt = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    for a, b in zip(plain, ckpt, strict=True):  # dropout is on: the recomputation replays the same masks
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    before, after = (load_file(tmp_path / name / "model" / "model.safetensors") for name in ("plain", "ckpt"))
    assert before.keys() == after.keys()
    for name in before:
        torch.testing.assert_close(after[name], before[name], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["gradient_checkpointing"] is True


def test_gradient_checkpointing_is_switched_on_in_the_model(corpus):
    from distill.pipeline.adapters import StudentFlags, prepare_student

    root, _ = corpus
    module = load_model(ModelConfig(str(root / "student"))).module
    assert prepare_student(module, "causal-lm", StudentFlags(gradient_checkpointing=True), seed=0) is module
    assert module.transformer.gradient_checkpointing  # transformers' own switch, read in the forward pass


# --- LoRA ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's, loading
def test_a_lora_student_trains_the_adapter_alone_and_saves_adapter_and_merged_model(corpus, tmp_path):
    pytest.importorskip("peft", reason="the lora extra is not installed: pip install 'distill[lora]'")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, common = corpus
    out = tmp_path / "lora"
    run("train-student", "--labels", root / "labels", "--student", root / "student", *common, "--out", out,
        "--steps", 4, "--batch-size", 4, "--workers", 0, "--lr", "0.01", "--lora-r", 4, "--lora-alpha", 8)
    base = AutoModelForCausalLM.from_pretrained(root / "student")
    original = base.state_dict()
    # the checkpoint holds the wrapped module: base weights untouched, the adapter's trained
    trained = load_file(out / "checkpoints" / "step-00000004" / "model.safetensors")
    lora = {k: v for k, v in trained.items() if ".lora_" in k}
    assert lora and all("c_attn" in k for k in lora)  # peft's default target for GPT-2
    assert any(k.endswith("lora_B.default.weight") and v.abs().max() > 0 for k, v in lora.items())  # B starts at 0
    for key, value in trained.items():
        if ".lora_" not in key:
            name = key.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(value, original[name], rtol=0, atol=0)
    # model/: a plain transformers model, the adapter merged in; adapter/: what peft loads
    merged = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    merged_state = merged.state_dict()
    changed = [k for k in original if not torch.equal(merged_state[k], original[k])]
    assert changed and all("c_attn.weight" in k for k in changed)
    assert load_model(ModelConfig(str(out))).output_size == 256  # the run directory is a model spec, as ever
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable_params"] == 4 * 32 + 96 * 4 < summary["params"]  # A (r, in) and B (out, r) of c_attn


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_a_wrapped_model_still_gives_logits_and_its_output_layer(tmp_path, task):
    pytest.importorskip("peft", reason="the lora extra is not installed: pip install 'distill[lora]'")
    from modelhelp import make_hf_causal_lm, make_hf_classifier, token_batch

    from distill.pipeline.adapters import StudentFlags, is_adapted, prepare_student
    from distill.pipeline.models import PER_DOCUMENT, output_layer, packed_attention

    make = make_hf_causal_lm if task == "causal-lm" else make_hf_classifier
    model = load_model(ModelConfig(str(make(tmp_path / "m"))))
    batch = token_batch(300, [7, 4])
    with torch.no_grad():
        before = model.logits(batch)
    model.module = prepare_student(model.module, task, StudentFlags(lora_r=2), seed=0)
    assert is_adapted(model.module)
    with torch.no_grad():  # LoRA's B starts at zero: the wrapped model computes what the base did
        torch.testing.assert_close(model.logits(batch), before, rtol=0, atol=0)
    if task == "causal-lm":  # (a transformers classifier has no output embeddings, wrapped or not)
        assert output_layer(model).out_features == model.output_size
        assert packed_attention(model) == PER_DOCUMENT  # the wrapper hands packed position ids on
    trainable = [n for n, p in model.module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n or (task == "classification" and ".score." in n) for n in trainable)
    assert task == "causal-lm" or any(".score." in n for n in trainable)  # a classifier's new head trains too


def test_a_lora_run_resumes_to_the_same_weights(corpus, tmp_path):
    pytest.importorskip("peft", reason="the lora extra is not installed: pip install 'distill[lora]'")
    root, common = corpus
    args = ["--steps", 4, "--checkpoint-every", 2, "--lora-r", 4, "--lora-targets", "c_attn,c_proj", "--lr", "0.01"]
    if importlib.util.find_spec("tensorboard") is not None:
        args += ["--log-to", "tensorboard"]
    teacher_run(root, common, tmp_path / "whole", *args)
    crashed = tmp_path / "crashed"
    teacher_run(root, common, crashed, *args)
    first_line = (crashed / "metrics.jsonl").read_text().splitlines()[0]
    # as if killed after the step-2 checkpoint: the later checkpoint and the final outputs never happened
    for name in ("checkpoints/step-00000004", "model", "adapter", "summary.json"):
        shutil.rmtree(crashed / name) if (crashed / name).is_dir() else (crashed / name).unlink()
    (crashed / "checkpoints" / "latest").write_text("step-00000002\n")
    teacher_run(root, common, crashed, *args)
    assert (crashed / "metrics.jsonl").read_text().splitlines()[0] == first_line  # resumed, not restarted
    assert [m["step"] for m in metrics(crashed)] == [1, 2, 3, 4]
    if importlib.util.find_spec("tensorboard") is not None:  # the crashed run's steps 3 and 4 are purged
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(crashed / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("loss")] == \
            [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in metrics(crashed)]
    for part in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        whole, resumed = load_file(tmp_path / "whole" / part), load_file(crashed / part)
        assert whole.keys() == resumed.keys()
        for name in whole:
            torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)
    targets = json.loads((crashed / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(targets) == ["c_attn", "c_proj"]


@pytest.mark.parametrize("args, message", [
    (["--lora-r", 4], "--lora-r 4 applies to Hugging Face models, and 'gpt:d_model=16,n_layers=1,n_heads=2,max_len=32' "
                      "is not a Hugging Face directory"),
    (["--gradient-checkpointing"], "--gradient-checkpointing applies to Hugging Face models"),
    (["--log-to", "mlflow"], "unknown --log-to 'mlflow': use tensorboard, wandb"),
])
def test_flags_that_cannot_apply_are_refused_in_one_line(corpus, tmp_path, args, message):
    root, common = corpus
    result = run("train-teacher", "--model", "gpt:d_model=16,n_layers=1,n_heads=2,max_len=32", *common,
                 "--out", tmp_path / "run", "--steps", 1, *args, ok=False)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_lora_targets_the_model_lacks_are_refused_in_one_line(corpus, tmp_path):
    pytest.importorskip("peft", reason="the lora extra is not installed: pip install 'distill[lora]'")
    root, common = corpus
    result = run("train-teacher", "--model", root / "student", *common, "--out", tmp_path / "run", "--steps", 1,
                 "--lora-r", 2, "--lora-targets", "q_proj", ok=False)
    assert result.exit_code == 2 and "{'q_proj'} not found" in result.stderr and "pass --lora-targets" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("package, args, message", [
    ("peft", ["--lora-r", 4], "--lora-r needs the peft package, which is not installed: pip install 'distill[lora]'"),
    ("tensorboard", ["--log-to", "tensorboard"], "pip install 'distill[tensorboard]'"),
    ("wandb", ["--log-to", "tensorboard,wandb"], "pip install 'distill[wandb]'"),
])
def test_a_missing_extra_is_named_in_one_line(corpus, tmp_path, monkeypatch, package, args, message):
    root, common = corpus
    monkeypatch.setitem(sys.modules, package, None)  # import fails, find_spec finds nothing: as if not installed
    for other in ("tensorboard",) if package == "wandb" else ():
        pytest.importorskip(other, reason=f"the {other} extra is not installed")
    result = run("train-teacher", "--model", root / "student", *common, "--out", tmp_path / "run", "--steps", 1, *args,
                 ok=False)
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# --- live metrics --------------------------------------------------------------------------------


def test_tensorboard_holds_every_metrics_line(corpus, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed: "
                                              "pip install 'distill[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, common = corpus
    out = tmp_path / "tb"
    teacher_run(root, common, out, "--steps", 3, "--log-to", "tensorboard", "--eval-split", "train", "--eval-every", 2)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    lines = metrics(out)
    loss = [(e.step, e.value) for e in events.Scalars("loss")]
    assert loss == [(m["step"], pytest.approx(m["loss"], rel=1e-6)) for m in lines if "loss" in m]
    perplexity = [(e.step, e.value) for e in events.Scalars("eval/perplexity")]
    assert perplexity == [(m["step"], pytest.approx(m["eval"]["perplexity"], rel=1e-6)) for m in lines if "eval" in m]
    assert [s for s, _ in perplexity] == [2, 3] and "lr" in events.Tags()["scalars"]


def test_wandb_logs_offline_into_the_run_directory(corpus, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed: pip install 'distill[wandb]'")
    root, common = corpus
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no login
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    teacher_run(root, common, out, "--steps", 2, "--log-to", "wandb")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # what `wandb sync` uploads later
    assert os.path.getsize(next(runs[0].glob("*.wandb"))) > 0
    run_id = (out / "wandb" / "distill-run-id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")

    # killed after the step-1 checkpoint and rerun: the resumed run continues the same wandb run
    resumed = tmp_path / "wb-resumed"
    teacher_run(root, common, resumed, "--steps", 2, "--checkpoint-every", 1, "--log-to", "wandb")
    first_id = (resumed / "wandb" / "distill-run-id").read_text().strip()
    for name in ("checkpoints/step-00000002", "model", "summary.json"):
        shutil.rmtree(resumed / name) if (resumed / name).is_dir() else (resumed / name).unlink()
    (resumed / "checkpoints" / "latest").write_text("step-00000001\n")
    teacher_run(root, common, resumed, "--steps", 2, "--checkpoint-every", 1, "--log-to", "wandb")
    assert (resumed / "wandb" / "distill-run-id").read_text().strip() == first_id
    parts = list((resumed / "wandb").glob("offline-run-*"))  # one per process; both of the one wandb run
    assert len(parts) == 2 and all(f"-{first_id}" in p.name and list(p.glob(f"run-{first_id}.wandb")) for p in parts)
