"""distill.storage's library API: a valid default ValueEncoding, a shard's labels <-> its files given the manifest
(checked against the store's own writer and reader on real stores), per-array bytes in the summary and `inspect`,
and a silent generate_labels(progress=False)."""

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from storehelp import make_labels, write_store

from distill.cli import cli
from distill.errors import StoreError
from distill.storage import (Manifest, StoreSpec, ValueEncoding, decode_shard, encode_shard, get_backend,
                             open_store)
from distill.storage.layout import shard_dir

ARRAYS = {"offsets", "ids_delta", "logprob_codes", "tail_logprob", "tempered_lse", "token_index", "metadata"}


def shard_files(root: Path, manifest: Manifest, index: int) -> dict[str, bytes]:
    """A shard's files read from disk by hand, as a program without distill's reader would."""
    record = manifest.shards[index]
    return {rel: (root / shard_dir(index) / rel).read_bytes() for rel in record.files}


def assert_same_labels(a, b):
    assert a.example_start == b.example_start and a.temperatures == b.temperatures
    for name in ("offsets", "topk_ids", "topk_logprobs", "tail_logprob", "tempered_lse", "counts", "token_index"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def test_default_value_encoding_is_the_stores_default():
    assert ValueEncoding() == ValueEncoding("sqrt", 255) == ValueEncoding.named("sqrt") == ValueEncoding.from_bits(8)
    assert ValueEncoding("lossless") == ValueEncoding.named("lossless") and ValueEncoding("lossless").levels == 0
    assert StoreSpec("topk", k=4, vocab_size=10, num_examples=1).value_encoding == ValueEncoding()
    assert ValueEncoding.from_json(ValueEncoding().to_json()) == ValueEncoding()
    with pytest.raises(ValueError, match="levels"):
        ValueEncoding("sqrt", 0)


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_shard_bytes_round_trip_against_the_stores_own_files_and_reader(tmp_path, backend, method):
    labels = make_labels(method, n_examples=13, token_index=True)
    root = tmp_path / "s"
    write_store(root, labels, method=method, backend=backend, encoding="sqrt", per_shard=5)
    reader = open_store(str(root))
    manifest = Manifest.from_bytes((root / "manifest.json").read_bytes())  # no reader needed
    for index in range(manifest.spec.num_shards):
        on_disk = shard_files(root, manifest, index)
        a, b = manifest.spec.shard_range(index)
        assert encode_shard(labels.examples(a, b), manifest) == on_disk  # the writer's very bytes
        decoded = decode_shard(on_disk, manifest, shard=index)
        assert_same_labels(decoded, reader.read_shard(index))
        assert decoded.example_start == a
        assert_same_labels(decode_shard(encode_shard(decoded, reader.spec), reader.spec, shard=index), decoded)


def test_lossless_shard_bytes_give_the_labels_back_exactly(backend):
    labels = make_labels("topk", n_examples=7, temperatures=(2.0,))
    spec = StoreSpec("topk", k=labels.k, vocab_size=300, num_examples=7, temperatures=(1.0, 2.0),
                     value_encoding="lossless", backend=backend)
    files = encode_shard(labels, spec)
    assert set(get_backend(backend).deserialize(files)) >= {"offsets", "logprobs", "tail_logprob", "tempered_lse"}
    back = decode_shard(files, spec)
    order = labels.topk_ids.argsort(dim=1)
    assert torch.equal(back.topk_ids, labels.topk_ids.gather(1, order))
    assert torch.equal(back.topk_logprobs, labels.topk_logprobs.gather(1, order))
    assert torch.equal(back.tail_logprob, labels.tail_logprob) and torch.equal(back.tempered_lse, labels.tempered_lse)


def test_shard_bytes_refuse_what_does_not_fit_the_manifest(tmp_path):
    labels = make_labels("topk", n_examples=5)
    write_store(tmp_path / "s", labels, per_shard=5)
    manifest = open_store(str(tmp_path / "s")).manifest
    with pytest.raises(StoreError, match="normalisers"):
        encode_shard(make_labels("topk", n_examples=5, temperatures=(3.0,)), manifest)
    with pytest.raises(StoreError, match="draw counts"):
        encode_shard(make_labels("sample", n_examples=5), manifest)
    with pytest.raises(StoreError, match="shard 1 does not exist"):
        decode_shard({}, manifest, shard=1)
    with pytest.raises(TypeError, match="Manifest or StoreSpec"):
        encode_shard(labels, "labels.zarr")
    files = encode_shard(make_labels("topk", n_examples=5, seed=2), manifest)  # 13 positions, the record says 14
    with pytest.raises(ValueError, match="commit record"):
        decode_shard(files, manifest, shard=0)


def test_summary_breaks_the_payload_down_by_array(tmp_path, backend):
    labels = make_labels("topk", n_examples=13, token_index=True)
    write_store(tmp_path / "s", labels, backend=backend, encoding="sqrt", per_shard=5)
    reader = open_store(str(tmp_path / "s"))
    s = reader.summary()
    by_array, per_position = s["bytes_by_array"], s["bytes_per_position_by_array"]
    assert set(by_array) == ARRAYS and all(v > 0 for v in by_array.values())
    assert sum(by_array.values()) == s["payload_bytes"]
    assert list(by_array.values()) == sorted(by_array.values(), reverse=True)
    assert per_position == {n: round(b / s["positions"], 3) for n, b in by_array.items()}
    if backend == "zarr":  # one chunk file per array: its bytes are that file's, summed over the shards
        chunks = sum(meta["bytes"] for r in reader.records.values() for rel, meta in r.files.items()
                     if rel.startswith("ids_delta/c/"))
        assert by_array["ids_delta"] == chunks

    text = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s")])
    assert text.exit_code == 0, text.output
    assert "bytes by array" in text.output and "bytes per position by array" in text.output
    line = next(x for x in text.output.splitlines() if x.startswith("bytes per position by array"))
    first = next(iter(per_position))  # largest first, in bytes: "ids_delta 1.36 B, logprob_codes 0.94 B, ..."
    assert f"{first} {per_position[first]:,.2f} B, " in line and "{" not in line
    out = CliRunner().invoke(cli, ["inspect", str(tmp_path / "s"), "--json"])
    assert json.loads(out.output)["bytes_by_array"] == by_array


def test_a_shard_whose_files_cannot_be_opened_counts_as_unreadable(tmp_path):
    write_store(tmp_path / "s", make_labels("topk", n_examples=13), backend="parquet", per_shard=5)
    reader = open_store(str(tmp_path / "s"))
    (tmp_path / "s" / shard_dir(1) / "entries.parquet").unlink()
    by_array = reader.summary()["bytes_by_array"]
    assert by_array["unreadable"] == reader.records[1].payload_bytes
    assert sum(by_array.values()) == sum(r.payload_bytes for r in reader.records.values())


def test_generate_labels_without_progress_prints_nothing(tmp_path, capfd):
    from distill.stages.generate import GenerateConfig, generate_labels

    def run(out, progress):
        generate_labels(GenerateConfig(teacher="mlp:hidden=16", data="mnist1d:num_samples=100", out=str(tmp_path / out),
                                       k=3, device="cpu", progress=progress))
        return capfd.readouterr()

    quiet = run("quiet", progress=False)
    assert quiet.err == "" and quiet.out == ""
    assert "complete" in run("loud", progress=True).err  # what progress=False silences
