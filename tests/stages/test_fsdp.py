"""FSDP2 (`--distributed fsdp`) under torchrun, on the CPU with gloo: sharded checkpoints, exact resume, whole model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from distill.cli import cli
from distill.pipeline.models import ModelConfig, load_model

HERE = Path(__file__).resolve().parent
GPT = "gpt:d_model=32,n_layers=2,n_heads=2,max_len=64,dropout=0.1"  # dropout: the RNG state must resume too


def _corpus(path: Path) -> Path:
    """2,600 lines of text: over 1,024 examples (a chunk) however it is cut, so each of two ranks streams a share."""
    g = torch.Generator().manual_seed(0)
    words = ["offline", "labels", "teach", "a", "small", "student"]
    lines = [" ".join(words[i] for i in torch.randint(len(words), (4,), generator=g).tolist()) for _ in range(2600)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _torchrun(target: list[str], out: Path, corpus: Path) -> subprocess.CompletedProcess:
    held_out = corpus.with_name("held-out.txt")  # 27 sequences, 7 batches: one rank scores 4, the other 3 + 1 unscored
    held_out.write_text("".join(corpus.read_text().splitlines(keepends=True)[:33]))
    args = ["train-teacher", "--model", GPT, "--data", str(corpus), "--tokenizer", "bytes", "--seq-len", "32",
            "--eval-split", "train", "--eval-data", str(held_out),
            "--batch-size", "4", "--grad-accum", "2", "--steps", "6", "--checkpoint-every", "2", "--workers", "0",
            "--device", "cpu", "--no-progress", "--distributed", "fsdp", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *target, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three torchrun launches of two processes: about a minute on 2 cores
def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    whole = _torchrun(["-m", "distill"], tmp_path / "whole", corpus)
    assert whole.returncode == 0, whole.stderr[-3000:]
    shards = tmp_path / "whole" / "checkpoints" / "step-00000006" / "shards"
    assert sorted(os.listdir(shards)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    assert not (shards.parent / "model.safetensors").exists()

    killed = _torchrun([str(HERE / "fsdpstop.py"), "1"], tmp_path / "killed", corpus)  # dies after step 2's
    assert killed.returncode != 0 and not (tmp_path / "killed" / "model").exists()
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    rerun = _torchrun(["-m", "distill"], tmp_path / "killed", corpus)
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    evals = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [e["eval"]["positions"] > 0 for e in evals if "eval" in e] == [True]  # at the end, on both ranks' shares
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise, on the CPU
    # the final model is whole, saved as a single process saves it (tied weights once), and loads
    model = load_model(ModelConfig(str(tmp_path / "whole")))
    full = model.module.state_dict()  # tied: lm_head.weight is stored, tok_emb.weight (the same tensor) is not
    assert set(full) - set(a) == {"tok_emb.weight"} and all(a[k].shape == full[k].shape for k in a)
    assert model.module.lm_head.weight is model.module.tok_emb.weight


def test_fsdp_in_one_process_is_refused_before_anything_is_written(tmp_path):
    corpus = _corpus(tmp_path / "corpus.txt")
    result = CliRunner().invoke(cli, ["train-teacher", "--model", GPT, "--data", str(corpus), "--tokenizer", "bytes",
                                      "--device", "cpu", "--distributed", "fsdp", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "--distributed fsdp" in result.stderr and "torchrun --nproc-per-node" in result.stderr
    assert not (tmp_path / "run").exists()


# --- the trainer with FSDP in this process: a process group of one rank (fast; the sharding is trivial) ---------

class _Stop(Exception):
    pass


@pytest.fixture
def one_rank(tmp_path):
    from distill.pipeline.runtime import Workers

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        yield Workers(0, 1, True)
    finally:
        torch.distributed.destroy_process_group()


def _fit(corpus: Path, run_dir: Path, team, distributed: str) -> dict[str, torch.Tensor]:
    """Train a fresh tiny gpt for 4 steps (resuming from ``run_dir``); its whole weights after."""
    from contextlib import nullcontext

    import torch.nn.functional as F

    from distill.pipeline.data import DataConfig, load_data
    from distill.pipeline.sharding import gathered_weights
    from distill.pipeline.tasks import IGNORE_INDEX, position_logits
    from distill.pipeline.trainer import RunPlace, Schedule, fit
    from distill.storage.stream import LabelStream

    student = load_model(ModelConfig("gpt:d_model=16,n_layers=2,n_heads=2,max_len=32,dropout=0.1"))
    student.module.train()
    data = load_data(DataConfig(str(corpus), task="causal-lm", tokenizer="bytes", seq_len=16, limit=32))
    stream = LabelStream(data, None, batch_size=4, seed=0)

    def loss(model, batch):
        logits, hard = position_logits(student, batch, "causal-lm", module=model)
        return {"loss": F.cross_entropy(logits.float(), hard, ignore_index=IGNORE_INDEX), "positions": len(hard)}

    schedule = Schedule(steps=4, grad_accum=2, checkpoint_every=2, workers=0, distributed=distributed)
    fit(student.module, stream, loss, schedule, RunPlace(str(run_dir), team, torch.device("cpu"), nullcontext, False))
    weights = gathered_weights(student.module, team.rank)
    return weights if weights is not None else student.module.state_dict()


def test_fsdp_checkpoints_are_sharded_and_resume_exactly(tmp_path, one_rank, monkeypatch):
    import distill.pipeline.trainer as trainer
    from distill.errors import ConfigError
    from distill.pipeline.runtime import Workers

    corpus = _corpus(tmp_path / "corpus.txt")
    whole = _fit(corpus, tmp_path / "whole", one_rank, "fsdp")
    step = tmp_path / "whole" / "checkpoints" / "step-00000004"
    assert sorted(os.listdir(step)) == ["shards", "trainer.pt"] and "optimizer" not in torch.load(step / "trainer.pt")

    real = trainer.save_sharded_checkpoint

    def stop_after_the_first(*args, **kwargs):
        real(*args, **kwargs)
        raise _Stop  # as a crash just after step 2's checkpoint

    monkeypatch.setattr(trainer, "save_sharded_checkpoint", stop_after_the_first)
    with pytest.raises(_Stop):
        _fit(corpus, tmp_path / "stopped", one_rank, "fsdp")
    monkeypatch.undo()
    resumed = _fit(corpus, tmp_path / "stopped", one_rank, "fsdp")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)

    plain = _fit(corpus, tmp_path / "plain", Workers(), "ddp")  # one process, no sharding: the same training
    assert all(torch.equal(whole[k], plain[k]) for k in plain)  # one rank: FSDP adds nothing to the arithmetic
    with pytest.raises(ConfigError, match="was written with --distributed fsdp: resume it the way it was written"):
        _fit(corpus, tmp_path / "whole", Workers(), "ddp")


def test_a_sharded_checkpoint_that_fails_mid_write_leaves_the_previous_one(tmp_path):
    from distill.pipeline.checkpoint import latest_checkpoint, save_sharded_checkpoint
    from distill.pipeline.runtime import Workers

    def shards(directory):
        Path(directory, "__0_0.distcp").write_bytes(b"shard")

    def torn(directory):
        Path(directory, "__0_0.distcp").write_bytes(b"sh")
        raise RuntimeError("a rank failed")

    first = save_sharded_checkpoint(str(tmp_path), 2, shards, {"position": {}}, Workers())
    with pytest.raises(RuntimeError, match="a rank failed"):
        save_sharded_checkpoint(str(tmp_path), 4, torn, {"position": {}}, Workers())
    assert latest_checkpoint(str(tmp_path)) == first  # and nothing of step 4 is left, not even its temporary directory
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["latest", "step-00000002"]
    assert sorted(os.listdir(first)) == ["shards", "trainer.pt"]


def test_the_blocks_sharded_are_the_transformer_layers():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from distill.pipeline.architectures import build_builtin
    from distill.pipeline.sharding import layer_blocks

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_embd=16, n_head=2, n_positions=32))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, num_key_value_heads=2))
    gpt = build_builtin("gpt", vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_len=32)
    assert layer_blocks(gpt2) == list(gpt2.transformer.h) and layer_blocks(llama) == list(llama.model.layers)
    assert layer_blocks(gpt) == list(gpt.blocks) and layer_blocks(build_builtin("mlp", in_features=4, num_classes=2)) == []
