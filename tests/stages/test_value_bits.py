"""`distill generate-labels --value-bits`: the stored precision, recorded in the manifest and refused when meaningless."""

import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.storage import ValueEncoding, open_store

MNIST = "mnist1d:num_samples=600"
MLP = "mlp:hidden=32"


def run(*args):
    return CliRunner().invoke(cli, ["generate-labels", "--no-progress", "--device", "cpu", *map(str, args)])


def test_value_bits_sets_the_stored_levels(tmp_path):
    common = ("--teacher", MLP, "--data", MNIST, "--k", 4, "--examples-per-shard", 240, "--batch-size", 64)
    for bits in (4, None):
        extra = () if bits is None else ("--value-bits", bits)
        result = run(*common, "--out", tmp_path / str(bits), *extra)
        assert result.exit_code == 0, result.output
    coarse, default = open_store(str(tmp_path / "4")), open_store(str(tmp_path / "None"))
    assert coarse.spec.value_encoding == ValueEncoding("sqrt", 15)
    assert default.spec.value_encoding == ValueEncoding("sqrt", 255)  # the default is unchanged: 8 bits
    a, b = coarse.read_all(), default.read_all()
    assert torch.equal(a.topk_ids, b.topk_ids)
    root_a = (0.5 * (a.topk_logprobs - a.topk_logprobs.amax(1, keepdim=True))).exp()
    root_b = (0.5 * (b.topk_logprobs - b.topk_logprobs.amax(1, keepdim=True))).exp()
    assert float((root_a - root_b).abs().max()) <= 0.5 / 15 + 0.5 / 255 + 1e-6


@pytest.mark.parametrize("args,message", [
    (("--value-bits", 6, "--value-encoding", "lossless"), "--value-bits sets the precision of --value-encoding sqrt"),
    (("--value-bits", 17), "--value-bits must be at most 16, got 17"),
    (("--value-bits", 1), "--value-bits must be at least 2, got 1"),
])
def test_meaningless_value_bits_is_one_line(tmp_path, args, message):
    result = run("--teacher", MLP, "--data", MNIST, "--out", tmp_path / "store", *args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "store").exists()
