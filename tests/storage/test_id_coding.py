"""Id coding "rank" (a per-shard frequency table): round trips against the default coding, on every backend."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from distill.errors import CorruptStoreError, IncompatibleStoreError, StoreError
from distill.storage import StoreSpec, create_store, open_store, topk_labels
from distill.storage.codecs import ValueEncoding, decode_labels, encode_labels
from distill.storage.synthetic import zipf_logits

from storehelp import K, V, make_labels, write_store

FIELDS = ("offsets", "topk_ids", "topk_logprobs", "tail_logprob", "tempered_lse", "counts", "token_index", "tail_ids",
          "tail_counts")


def assert_same_labels(a, b):
    """Every field equal, bit for bit (both decoded from the same codes, only the id coding differs)."""
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


def write_both(tmp_path, labels, **kw):
    """The same labels written with each id coding; both stores read back whole."""
    back = {}
    for coding in ("delta", "rank"):
        url = tmp_path / coding
        write_store(url, labels, id_coding=coding, **kw)
        back[coding] = open_store(str(url)).read_all()
    return back


@pytest.mark.parametrize("encoding", ["lossless", "sqrt"])
@pytest.mark.parametrize("method", ["topk", "sample"])
def test_rank_coding_reads_back_what_delta_coding_does(backend, tmp_path, method, encoding):
    """Sample padding slots (count 0, repeating an id) stay after the slot they repeat; per_shard=5 leaves empty examples."""
    labels = make_labels(method, n_examples=40, token_index=True)
    back = write_both(tmp_path, labels, method=method, backend=backend, encoding=encoding)
    assert_same_labels(back["rank"], back["delta"])
    if method == "sample":
        assert bool((back["rank"].counts == 0).any())  # the padding case was exercised


def test_rank_coding_with_tail_draws(backend, tmp_path):
    labels = make_labels("topk", n_examples=30, tail_samples=5)
    back = write_both(tmp_path, labels, backend=backend, tail_samples=5, extra={"sampling": "systematic"})
    assert_same_labels(back["rank"], back["delta"])
    assert back["rank"].tail_ids is not None


def test_rank_coding_with_k_equal_to_the_vocabulary(backend, tmp_path):
    logits = zipf_logits(12, 9, torch.Generator().manual_seed(3))
    labels = topk_labels(logits, 9, (), lengths=[5, 0, 7])
    back = {}
    for coding in ("delta", "rank"):
        spec = StoreSpec("topk", k=9, vocab_size=9, num_examples=3, examples_per_shard=2, value_encoding="lossless",
                         backend=backend, id_coding=coding)
        writer = create_store(str(tmp_path / coding), spec)
        for i in range(spec.num_shards):
            writer.write_shard(i, labels.examples(*spec.shard_range(i)))
        writer.finalize()
        back[coding] = open_store(str(tmp_path / coding)).read_all()
    assert_same_labels(back["rank"], back["delta"])
    assert torch.equal(back["rank"].topk_ids, torch.arange(9).expand(12, 9))


def test_rank_coding_of_an_empty_store(backend, tmp_path):
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=0, temperatures=(1, 2, 4), backend=backend, id_coding="rank")
    writer = create_store(str(tmp_path / "s"), spec)
    writer.write_shard(0, make_labels("topk", n_examples=4).examples(0, 0))
    writer.finalize()
    assert open_store(str(tmp_path / "s")).read_all().num_positions == 0


def test_rank_table_orders_ids_by_frequency_ties_by_id():
    ids = torch.tensor([[1, 4, 7], [4, 7, 9], [2, 4, 9], [0, 1, 4]])  # counts: 4:4, 1,7,9:2, 0,2:1
    labels = topk_labels(torch.zeros(4, 10), 3, ())
    labels = dataclasses.replace(labels, topk_ids=ids, topk_logprobs=-torch.arange(12.0).reshape(4, 3))
    columns = encode_labels(labels, 10, ValueEncoding("lossless"), "rank")
    assert columns["id_order"].tolist() == [4, 1, 7, 9, 0, 2]
    ranks = np.cumsum(columns["ranks_delta"].astype(np.int64), axis=1)
    assert ranks.tolist() == [[0, 1, 2], [0, 2, 3], [0, 3, 5], [0, 1, 4]]  # ascending within each position
    assert columns["logprobs"][0].tolist() == [-1.0, -0.0, -2.0]  # values follow their ids: id 4 first
    assert "ids_delta" not in columns
    back = decode_labels(columns, 3, ValueEncoding("lossless"), ())
    assert torch.equal(back.topk_ids, ids) and torch.equal(back.topk_logprobs, labels.topk_logprobs)


def test_a_rank_beyond_the_table_is_refused():
    labels = make_labels("topk", n_examples=6)
    columns = encode_labels(labels, V, ValueEncoding("lossless"), "rank")
    columns["id_order"] = columns["id_order"][:3]  # the ranks now point past the table
    with pytest.raises(IndexError):
        decode_labels(columns, K, ValueEncoding("lossless"), (2.0, 4.0))


def test_manifest_records_the_coding_only_when_not_the_default(tmp_path):
    labels = make_labels("topk", n_examples=6)
    write_store(tmp_path / "delta", labels)
    write_store(tmp_path / "rank", labels, id_coding="rank")
    assert "id_coding" not in json.loads((tmp_path / "delta" / "manifest.json").read_text())
    assert json.loads((tmp_path / "rank" / "manifest.json").read_text())["id_coding"] == "rank"
    assert open_store(str(tmp_path / "rank")).spec.id_coding == "rank"
    assert open_store(str(tmp_path / "delta")).spec.id_coding == "delta"
    assert open_store(str(tmp_path / "rank")).summary()["id_coding"] == "rank"  # what `distill inspect` prints
    assert "id_coding" not in open_store(str(tmp_path / "delta")).summary()
    files = set(open_store(str(tmp_path / "delta")).records[0].files)
    assert "ids_delta/zarr.json" in files and not any(f.startswith(("id_order", "ranks_delta")) for f in files)


def test_resuming_with_another_id_coding_is_refused(tmp_path):
    labels = make_labels("topk", n_examples=6)
    write_store(tmp_path / "s", labels, finalize=False)
    spec = dataclasses.replace(open_store(str(tmp_path / "s")).spec, id_coding="rank")
    with pytest.raises(IncompatibleStoreError, match="id_coding"):
        create_store(str(tmp_path / "s"), spec)


def test_an_unknown_id_coding_is_refused():
    with pytest.raises(StoreError, match="unknown id coding"):
        StoreSpec("topk", k=K, vocab_size=V, num_examples=1, id_coding="huffman")


def test_a_damaged_table_is_a_corrupt_shard_not_wrong_labels(tmp_path, monkeypatch):
    """A table shorter than its ranks (a writer bug; checksums catch damage on disk) fails the shard read."""
    import distill.storage.shards as shards_module  # where the writer encodes a shard

    def short_table(*args):
        columns = encode_labels(*args)
        columns["id_order"] = columns["id_order"][:2]
        return columns

    monkeypatch.setattr(shards_module, "encode_labels", short_table)
    write_store(tmp_path / "s", make_labels("topk", n_examples=6), id_coding="rank")
    with pytest.raises(CorruptStoreError, match="cannot be decoded"):
        open_store(str(tmp_path / "s")).read_all()


def generate(*args):
    from click.testing import CliRunner

    from distill.cli import cli

    return CliRunner().invoke(cli, ["generate-labels", "--no-progress", "--device", "cpu", "--teacher", "mlp:hidden=32",
                                    "--data", "mnist1d:num_samples=300", "--k", 6, "--batch-size", 64, *map(str, args)])


def test_generate_labels_id_coding_rank_reads_back_the_same_labels(tmp_path):
    for coding in ("delta", "rank"):
        result = generate("--out", tmp_path / coding, "--id-coding", coding, "--examples-per-shard", 128)
        assert result.exit_code == 0, result.output
    delta, rank = open_store(str(tmp_path / "delta")), open_store(str(tmp_path / "rank"))
    assert (delta.spec.id_coding, rank.spec.id_coding) == ("delta", "rank")
    assert_same_labels(rank.read_all(), delta.read_all())
    result = generate("--out", tmp_path / "rank", "--examples-per-shard", 128)  # resuming with the default coding
    assert result.exit_code == 2 and "id_coding='rank'" in result.stderr and result.stderr.count("\n") == 1, result.stderr


def test_an_unknown_id_coding_flag_is_one_line(tmp_path):
    result = generate("--out", tmp_path / "s", "--id-coding", "huffman")
    assert result.exit_code == 2 and "'huffman' is not one of 'delta', 'rank'" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "s").exists()
