"""`distill inspect` on a real store, and the store benchmark's quick path."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from storehelp import make_labels, write_store

from distill.cli import cli

REQUIRED = {"format_version", "method", "backend", "examples", "positions", "k", "vocab_size", "temperatures",
            "shards_complete", "shards_total", "payload_bytes", "bytes_per_position", "bytes_per_entry",
            "topk_mass_mean"}


def test_inspect_json_reports_the_issue_figures(tmp_path):
    labels = make_labels("topk", n_examples=12)
    write_store(tmp_path / "s", labels, encoding="sqrt", per_shard=5)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s"), "--json", "--verify"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert REQUIRED <= summary.keys()
    assert summary["positions"] == labels.num_positions and summary["shards_complete"] == 3
    assert summary["damaged_shards"] == []
    assert 0 < summary["topk_mass_mean"] <= 1


def test_inspect_verify_names_a_damaged_shard(tmp_path):
    write_store(tmp_path / "s", make_labels("topk", n_examples=12), per_shard=5)
    chunk = next(p for p in (tmp_path / "s" / "shards" / "000002").rglob("c/*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 0x40]))
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s"), "--json", "--verify"])
    assert result.exit_code == 1, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert [d["shard"] for d in summary["damaged_shards"]] == [2] and summary["shards_unreadable"] == [2]
    assert "shard 2" in summary["damaged_shards"][0]["error"]


def test_store_benchmark_prints_one_json_object_last():
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "store.py"
    out = subprocess.run([sys.executable, str(bench), "--quick", "--positions", "64", "--no-sweep"], capture_output=True,
                         text=True, timeout=300, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    for key in ("V32000_k64", "V128256_k50"):
        r = result[key]
        for field in ("bytes_per_position", "bytes_per_entry", "encode_positions_per_s", "decode_positions_per_s",
                      "kl_mean", "naive_bytes_per_position", "packed_bytes_per_position"):
            assert r[field] > 0, field
        assert r["kl_mean"] < 1e-3
        for coding in ("delta", "rank"):  # both id codings side by side on the same labels
            assert r["id_coding"][coding]["bytes_per_position"] > 0 and r["id_coding"][coding]["ids_bytes_per_position"] > 0


@pytest.mark.slow
def test_store_benchmark_sweeps_the_value_bits_and_k():
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "store.py"
    out = subprocess.run([sys.executable, str(bench), "--quick", "--positions", "64"], capture_output=True,
                         text=True, timeout=600, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    sweep = result["V128256_k50"]["sweep"]
    assert sweep["bits4"]["bytes_per_position"] < sweep["bits8"]["bytes_per_position"] < sweep["lossless"]["bytes_per_position"]
    assert sweep["bits4"]["kl_mean"] > sweep["bits8"]["kl_mean"] > sweep["lossless"]["kl_mean"] >= 0
    assert "budget_point" in result and result["k_sweep"]


def test_store_benchmark_runs_one_workload_at_a_chosen_shard_size():
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "store.py"
    out = subprocess.run([sys.executable, str(bench), "--quick", "--positions", "64", "--no-sweep", "--workload",
                          "V32000_k64", "--shard-positions", "16"], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["shard_positions"] == 16 and "V32000_k64" in result and "V128256_k50" not in result
    assert result["V32000_k64"]["encode_positions_per_s"] > 0
