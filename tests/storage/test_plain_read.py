"""docs/FORMAT.md is enough to read a store: decode one with json, zlib, numpy, zarr, pyarrow.

distill writes each store; everything after that (checksums, layout, decoding, tempering)
is reimplemented here from the document alone, then compared with distill's reader.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from distill.storage import StoreSpec, create_store, open_store, sampled_labels, topk_labels
from distill.storage.synthetic import zipf_logits

V, K = 500, 8
TEMPERATURES = (1.0, 2.0)
PER_SHARD = 3
# Ragged, with empty examples and a shard (the second) that holds no positions at all.
LENGTHS = [3, 0, 2, 0, 0, 0, 4, 1]


# --------------------------------------------------------------------------------------
# The plain reader: only json, zlib, numpy, zarr and pyarrow, following docs/FORMAT.md.
# --------------------------------------------------------------------------------------
def checked_json(path: Path) -> dict:
    """A JSON document whose ``crc32`` covers the canonical JSON of its other fields."""
    doc = json.loads(path.read_bytes())
    body = {k: v for k, v in doc.items() if k != "crc32"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert doc["crc32"] == f"{zlib.crc32(canonical.encode()):08x}", f"{path} fails its crc32"
    return doc


def commit_record(root: Path, index: int) -> dict | None:
    path = root / "shards" / f"{index:06d}.commit.json"
    return checked_json(path) if path.is_file() else None


def verify_files(root: Path, record: dict) -> None:
    shard = root / "shards" / f"{record['index']:06d}"
    for rel, meta in record["files"].items():
        data = (shard / rel).read_bytes()
        assert len(data) == meta["bytes"], rel
        assert f"{zlib.crc32(data):08x}" == meta["crc32"], rel


def load_zarr(shard: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(shard), mode="r", zarr_format=3)
    return {name: arr[...] for name, arr in group.arrays()}


def load_parquet(shard: Path, k: int) -> dict[str, np.ndarray]:
    cols = {"offsets": pq.read_table(shard / "examples.parquet").column("offsets").to_numpy()}
    positions = pq.read_table(shard / "positions.parquet")
    lse = sorted((n for n in positions.column_names if n.startswith("tempered_lse_")), key=lambda n: int(n.rsplit("_", 1)[1]))
    n_pos = positions.num_rows
    if lse:
        cols["tempered_lse"] = np.stack([positions.column(n).to_numpy() for n in lse], axis=1).reshape(n_pos, len(lse))
    for name in positions.column_names:
        if name not in lse:
            cols[name] = positions.column(name).to_numpy()
    entries = pq.read_table(shard / "entries.parquet")
    for name in entries.column_names:
        cols[name] = entries.column(name).to_numpy().reshape(n_pos, k)  # position-major
    if (shard / "tail.parquet").is_file():  # tail draws: (P, M) position-major
        tail = pq.read_table(shard / "tail.parquet")
        for name in tail.column_names:
            cols[name] = tail.column(name).to_numpy().reshape(n_pos, -1) if n_pos else tail.column(name).to_numpy()
    if (shard / "ids.parquet").is_file():  # id coding "rank": the shard's id table, (D,)
        cols["id_order"] = pq.read_table(shard / "ids.parquet").column("id_order").to_numpy()
    return cols


def rank_coded_ids(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Id coding "rank": ids = id_order[ranks], then each position re-sorted by id (stably), its slot arrays with it."""
    ranks = np.cumsum(cols["ranks_delta"].astype(np.int64), axis=1)
    ids = cols["id_order"].astype(np.int64)[ranks]
    order = np.argsort(ids, axis=1, kind="stable")
    for name in ("logprobs", "logprob_codes", "counts"):
        if name in cols:
            cols[name] = np.take_along_axis(cols[name], order, axis=1)
    return np.take_along_axis(ids, order, axis=1)


def decode(cols: dict[str, np.ndarray], manifest: dict) -> dict[str, np.ndarray]:
    enc = manifest["value_encoding"]
    if manifest.get("id_coding", "delta") == "rank":  # optional key: absent means "delta"
        ids = rank_coded_ids(cols)
    else:
        ids = np.cumsum(cols["ids_delta"].astype(np.int64), axis=1)
    tail = cols["tail_logprob"].astype(np.float32)
    counts = cols.get("counts")
    counts = None if counts is None else counts.astype(np.int32)
    if enc["name"] == "lossless":
        logp = cols["logprobs"].astype(np.float32)
    else:
        levels = enc["levels"]
        root = np.arange(levels + 1, dtype=np.float64) / levels
        root[0] = 0.25 / levels
        log_table, p_table = np.log(root * root).astype(np.float32), (root * root).astype(np.float32)
        codes = cols["logprob_codes"]
        assert int(codes.max(initial=0)) <= levels
        logp = log_table[codes]
        p = p_table[codes] if counts is None else np.where(counts > 0, p_table[codes], np.float32(0))
        mass = p.sum(axis=1, dtype=np.float32)
        target = -np.expm1(tail.astype(np.float64))
        logp = logp + np.log(target / mass).astype(np.float32)[:, None]
    if counts is not None:
        logp = np.where(counts > 0, logp, np.float32(-np.inf))
    n = len(ids)
    lse = cols.get("tempered_lse", np.zeros((n, 0), np.float32)).astype(np.float32)
    draws = manifest.get("tail_samples", 0)  # optional key: absent in stores without tail draws
    tail_ids = tail_counts = None
    if draws:
        tail_ids = np.cumsum(cols["tail_ids_delta"].reshape(n, draws).astype(np.int64), axis=1)
        tail_counts = cols["tail_counts"].reshape(n, draws).astype(np.int32)
    return {"offsets": cols["offsets"].astype(np.int64), "ids": ids, "logprobs": logp.astype(np.float32), "tail": tail,
            "tempered_lse": lse, "counts": counts, "token_index": cols.get("token_index"), "tail_ids": tail_ids,
            "tail_counts": tail_counts}


def tempered(dec: dict, manifest: dict, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    if temperature == 1.0:
        return dec["logprobs"], dec["tail"]
    j = [t for t in manifest["temperatures"] if t != 1.0].index(temperature)
    lp = dec["logprobs"].astype(np.float64) / temperature - dec["tempered_lse"][:, j : j + 1].astype(np.float64)
    mass = np.exp(lp).sum(axis=1)
    tail = np.clip(1.0 - mass, 0.0, None)
    tail[np.isneginf(dec["tail"])] = 0.0  # FORMAT.md's empty-tail rule: empty at T=1, empty at every T
    log_total = np.log(mass + tail)
    with np.errstate(divide="ignore"):
        return (lp - log_total[:, None]).astype(np.float32), (np.log(tail) - log_total).astype(np.float32)


def read_plain(root: Path) -> tuple[dict, list[dict]]:
    """The manifest and every shard decoded, checking all checksums on the way."""
    manifest = checked_json(root / "manifest.json")
    assert manifest["format"] == "distill-soft-labels" and manifest["format_version"] == 1
    n, per = manifest["num_examples"], manifest["examples_per_shard"]
    num_shards = max(1, math.ceil(n / per))
    assert len(manifest["shards"]) == num_shards
    shards = []
    for i in range(num_shards):
        record = commit_record(root, i)
        assert record is not None and record["status"] == "complete"
        assert record["index"] == i
        assert (record["example_start"], record["example_stop"]) == (i * per, min((i + 1) * per, n))
        if manifest["finalized"]:
            assert manifest["shards"][i] == {k: v for k, v in record.items() if k != "crc32"}
        verify_files(root, record)
        shard = root / "shards" / f"{i:06d}"
        cols = load_zarr(shard) if manifest["backend"] == "zarr" else load_parquet(shard, manifest["k"])
        dec = decode(cols, manifest)
        assert len(dec["offsets"]) == record["example_stop"] - record["example_start"] + 1
        assert dec["offsets"][0] == 0 and dec["offsets"][-1] == record["positions"] == len(dec["ids"])
        shards.append({"record": record, **dec})
    return manifest, shards


# --------------------------------------------------------------------------------------
# The stores distill writes, and the comparison.
# --------------------------------------------------------------------------------------
def make_labels(method: str, token_index: bool):
    g = torch.Generator().manual_seed(1234)
    logits = zipf_logits(sum(LENGTHS), V, g)
    stored_t = tuple(t for t in TEMPERATURES if t != 1.0)
    if method == "topk":
        labels = topk_labels(logits, K, stored_t, lengths=LENGTHS)
    else:
        labels = sampled_labels(logits, K, stored_t, lengths=LENGTHS, generator=g)
    if token_index:
        labels.token_index = torch.cat([torch.arange(n, dtype=torch.int32) + 5 for n in LENGTHS])
    return labels


def write(root: Path, labels, method: str, backend: str, encoding: str, id_coding: str = "delta") -> None:
    spec = StoreSpec(method, k=K, vocab_size=V, num_examples=labels.num_examples, examples_per_shard=PER_SHARD,
                     temperatures=TEMPERATURES, value_encoding=encoding, backend=backend, id_coding=id_coding,
                     teacher_fingerprint="teacher-x", dataset_fingerprint="data-y",
                     has_token_index=labels.token_index is not None, extra={"note": "plain-read test"})
    writer = create_store(str(root), spec)
    for i in range(spec.num_shards):
        a, b = spec.shard_range(i)
        writer.write_shard(i, labels.examples(a, b))
    writer.finalize()


def assert_same_logprobs(actual: np.ndarray, expected: np.ndarray, atol: float) -> None:
    assert actual.shape == expected.shape
    assert np.array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert np.isfinite(actual[finite]).all()
    if atol == 0:
        assert np.array_equal(actual[finite], expected[finite])
    else:
        np.testing.assert_allclose(actual[finite], expected[finite], rtol=0, atol=atol)


@pytest.mark.parametrize("id_coding", ["delta", "rank"])
@pytest.mark.parametrize("method", ["topk", "sample"])
@pytest.mark.parametrize("encoding", ["lossless", "sqrt"])
@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_plain_read_matches_distill(tmp_path, backend, encoding, method, id_coding):
    token_index = method == "topk"  # one of each: token_index present (topk) and absent (sample)
    labels = make_labels(method, token_index)
    root = tmp_path / "labels.store"
    write(root, labels, method, backend, encoding, id_coding)
    assert checked_json(root / "manifest.json").get("id_coding", "delta") == id_coding

    manifest, shards = read_plain(root)
    assert len(shards) == 3 and [s["record"]["positions"] for s in shards] == [5, 0, 5]
    assert manifest["method"] == method and manifest["backend"] == backend and manifest["k"] == K
    assert manifest["vocab_size"] == V and manifest["num_examples"] == len(LENGTHS)
    assert manifest["temperatures"] == list(TEMPERATURES) and manifest["finalized"] is True
    assert manifest["has_token_index"] is token_index and manifest["extra"] == {"note": "plain-read test"}
    assert manifest["teacher_fingerprint"] == "teacher-x" and manifest["dataset_fingerprint"] == "data-y"
    assert manifest["sample_temperature"] == (1.0 if method == "sample" else None)
    if encoding == "lossless":
        assert manifest["value_encoding"] == {"name": "lossless"}
    else:  # default: one byte per code
        assert manifest["value_encoding"] == {"name": "sqrt", "levels": 255}

    reader = open_store(str(root))
    exact = 0.0 if encoding == "lossless" else 1e-6
    for i, plain in enumerate(shards):
        ref = reader.read_shard(i)
        start, stop = plain["record"]["example_start"], plain["record"]["example_stop"]
        original = labels.examples(start, stop)
        order = original.topk_ids.argsort(dim=1, stable=True)

        assert np.array_equal(plain["offsets"], ref.offsets.numpy())
        assert np.array_equal(plain["offsets"], original.offsets.numpy())
        assert np.array_equal(plain["ids"], ref.topk_ids.numpy())
        assert np.array_equal(plain["ids"], original.topk_ids.gather(1, order).numpy())
        assert (np.diff(plain["ids"], axis=1) >= 0).all() and ((plain["ids"] >= 0) & (plain["ids"] < V)).all()
        assert_same_logprobs(plain["logprobs"], ref.topk_logprobs.numpy(), exact)
        assert np.array_equal(plain["tail"], ref.tail_logprob.numpy())
        assert np.array_equal(plain["tempered_lse"], ref.tempered_lse.numpy())
        if encoding == "lossless":  # bit-exact against what was written, too
            assert_same_logprobs(plain["logprobs"], original.topk_logprobs.gather(1, order).numpy(), 0.0)
            assert np.array_equal(plain["tail"], original.tail_logprob.numpy())
            assert np.array_equal(plain["tempered_lse"], original.tempered_lse.numpy())
        else:  # lossy, but close to the truth
            if len(plain["ids"]):
                truth = original.topk_logprobs.gather(1, order).numpy()
                live = np.isfinite(truth)
                assert np.abs(np.exp(plain["logprobs"][live]) - np.exp(truth[live])).max() < 0.02
            np.testing.assert_allclose(plain["tail"], original.tail_logprob.numpy(), rtol=2e-3, atol=1e-3)

        if method == "sample":
            counts = plain["counts"]
            assert np.array_equal(counts, ref.counts.numpy())
            assert np.array_equal(counts, original.counts.gather(1, order).numpy())
            assert (counts.sum(axis=1) == K).all()
            pad = counts == 0
            assert np.array_equal(np.isneginf(plain["logprobs"]), pad)
            # Unique ids ascending; padding repeats the last id (a zero gap) at the end.
            gaps = np.diff(plain["ids"], axis=1)
            assert np.array_equal(gaps == 0, pad[:, 1:])
            assert (np.diff(pad.astype(np.int8), axis=1) >= 0).all()
        else:
            assert plain["counts"] is None and ref.counts is None
            assert (np.diff(plain["ids"], axis=1) > 0).all()

        if token_index:
            assert np.array_equal(plain["token_index"], ref.token_index.numpy())
        else:
            assert plain["token_index"] is None

        for t in TEMPERATURES:
            lp, tail = tempered(plain, manifest, t)
            ref_lp, ref_tail = ref.tempered(t)
            assert_same_logprobs(lp, ref_lp.numpy(), exact if t == 1.0 else 1e-6)
            assert_same_logprobs(tail, ref_tail.numpy(), 0.0 if t == 1.0 else 1e-6)
            if len(lp):  # K + 1 buckets form a distribution
                total = np.exp(lp.astype(np.float64)).sum(1) + np.exp(tail.astype(np.float64))
                np.testing.assert_allclose(total, 1.0, atol=1e-5)
            if encoding == "lossless" and t != 1.0:  # tempered values from the store = from the labels written
                want_lp, want_tail = original.tempered(t)
                assert_same_logprobs(lp, want_lp.gather(1, order).numpy(), 1e-6)
                assert_same_logprobs(tail, want_tail.numpy(), 1e-6)


def test_damaged_file_fails_plain_crc(tmp_path):
    """The per-file CRC-32 in the commit record catches a flipped byte."""
    root = tmp_path / "labels.store"
    write(root, make_labels("topk", False), "topk", "zarr", "lossless")
    record = commit_record(root, 0)
    rel = next(r for r in record["files"] if r.startswith("ids_delta/c/"))
    path = root / "shards" / "000000" / rel
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(AssertionError):
        verify_files(root, record)


@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_plain_read_of_tail_draws(tmp_path, backend):
    """A top-k store with tail draws: the optional manifest key and the two arrays, as FORMAT.md says."""
    g = torch.Generator().manual_seed(99)
    logits = zipf_logits(sum(LENGTHS), V, g)
    labels = topk_labels(logits, K, (2.0,), lengths=LENGTHS, tail_samples=6, generator=g)
    root = tmp_path / "labels.store"
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=len(LENGTHS), examples_per_shard=PER_SHARD,
                     temperatures=TEMPERATURES, backend=backend, tail_samples=6, extra={"sampling": "systematic"})
    writer = create_store(str(root), spec)
    for i in range(spec.num_shards):
        writer.write_shard(i, labels.examples(*spec.shard_range(i)))
    writer.finalize()

    manifest, shards = read_plain(root)
    assert manifest["tail_samples"] == 6 and manifest["sample_temperature"] == 1.0
    reader = open_store(str(root))
    for i, plain in enumerate(shards):
        ref, original = reader.read_shard(i), labels.examples(*spec.shard_range(i))
        assert np.array_equal(plain["tail_ids"], ref.tail_ids.numpy())
        assert np.array_equal(plain["tail_counts"], ref.tail_counts.numpy())
        assert np.array_equal(plain["tail_counts"], original.tail_counts.numpy())
        live = plain["tail_counts"] > 0
        assert np.array_equal(plain["tail_ids"][live], original.tail_ids.numpy()[live])
        assert (plain["tail_counts"].sum(1) == 6).all()
        for row, ids in zip(plain["tail_ids"], plain["ids"]):  # drawn from outside the top k
            assert not set(row.tolist()) & set(ids.tolist())


def test_a_store_without_tail_draws_has_no_tail_samples_key(tmp_path):
    """Stores without draws keep the exact manifest keys every earlier version wrote."""
    root = tmp_path / "labels.store"
    write(root, make_labels("topk", False), "topk", "zarr", "sqrt")
    assert "tail_samples" not in checked_json(root / "manifest.json")


@pytest.mark.parametrize("encoding", ["lossless", "sqrt"])
@pytest.mark.parametrize("backend", ["zarr", "parquet"])
def test_plain_read_keeps_an_empty_tail_empty_at_every_temperature(tmp_path, backend, encoding):
    """k = V (every class kept, as for mnist1d): FORMAT.md's reading gives an empty tail at every stored T, as distill's."""
    vocab, temperatures = 10, (0.5, 1.0, 2.0, 4.0)
    g = torch.Generator().manual_seed(5)
    labels = topk_labels(zipf_logits(sum(LENGTHS), vocab, g), vocab, (0.5, 2.0, 4.0), lengths=LENGTHS)
    root = tmp_path / "labels.store"
    spec = StoreSpec("topk", k=vocab, vocab_size=vocab, num_examples=len(LENGTHS), examples_per_shard=PER_SHARD,
                     temperatures=temperatures, value_encoding=encoding, backend=backend)
    writer = create_store(str(root), spec)
    for i in range(spec.num_shards):
        writer.write_shard(i, labels.examples(*spec.shard_range(i)))
    writer.finalize()

    manifest, shards = read_plain(root)
    reader = open_store(str(root))
    phantom = 0.0  # the tail mass a reader without the rule would report
    for i, plain in enumerate(shards):
        ref = reader.read_shard(i)
        assert np.isneginf(plain["tail"]).all()
        assert np.array_equal(plain["ids"], np.tile(np.arange(vocab), (len(plain["ids"]), 1)))
        for t in temperatures:
            lp, tail = tempered(plain, manifest, t)
            ref_lp, ref_tail = ref.tempered(t)
            assert np.isneginf(tail).all() and np.isneginf(ref_tail.numpy()).all()
            assert_same_logprobs(lp, ref_lp.numpy(), 0.0 if encoding == "lossless" and t == 1.0 else 1e-6)
            if len(lp):
                np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(1), 1.0, atol=1e-6)
                if t != 1.0:
                    j = [u for u in manifest["temperatures"] if u != 1.0].index(t)
                    mass = np.exp(plain["logprobs"].astype(np.float64) / t - plain["tempered_lse"][:, j : j + 1]).sum(1)
                    phantom = max(phantom, float(np.clip(1.0 - mass, 0.0, None).max()))
    if encoding == "sqrt":  # the rule matters: float16 normalisers leave 1 - mass above 0 somewhere
        assert phantom > 1e-5
