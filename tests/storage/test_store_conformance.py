"""The store's conformance suite: every test runs against every backend."""

import json

import pytest
import torch

from distill.errors import CorruptStoreError, IncompatibleStoreError, StoreError
from distill.storage import StoreSpec, create_store, open_store
from distill.storage.fs import StoreFS
from distill.storage.layout import commit_path, shard_dir

from storehelp import K, V, by_id, make_labels, write_store


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_lossless_round_trip_is_exact(backend, store_url, method):
    labels = make_labels(method, token_index=True)
    write_store(store_url, labels, method=method, backend=backend)
    back = open_store(store_url).read_all()
    ids, lp, counts = by_id(labels)
    assert torch.equal(back.offsets, labels.offsets)
    assert torch.equal(back.topk_ids, ids)
    assert torch.equal(back.topk_logprobs, lp)
    assert torch.equal(back.tail_logprob, labels.tail_logprob)
    assert torch.equal(back.tempered_lse, labels.tempered_lse)
    assert torch.equal(back.token_index, labels.token_index)
    assert back.temperatures == (2.0, 4.0)
    if method == "sample":
        assert torch.equal(back.counts, counts)
        assert bool((back.counts.sum(1) == K).all())


def test_lossy_round_trip_keeps_ids_and_bounds_kl(backend, store_url):
    labels = make_labels("topk", n_examples=60)
    write_store(store_url, labels, backend=backend, encoding="sqrt")
    back = open_store(store_url).read_all()
    ids, lp, _ = by_id(labels)
    assert torch.equal(back.topk_ids, ids)
    p = torch.cat([lp, labels.tail_logprob[:, None]], 1).double()
    q = torch.cat([back.topk_logprobs, back.tail_logprob[:, None]], 1).double()
    assert torch.allclose(q.exp().sum(1), torch.ones(len(q), dtype=torch.float64), atol=1e-5)
    kl = (p.exp() * (p - q)).sum(1)
    assert float(kl.mean()) < 1e-4 and float(kl.max()) < 1e-3


def test_random_access_and_batches_match_the_whole(backend, store_url):
    labels = make_labels("topk", n_examples=17)
    write_store(store_url, labels, backend=backend, per_shard=4)
    reader = open_store(store_url)
    whole = reader.read_all()
    for e in [0, 3, 4, 9, 16]:
        one = reader.example(e)
        a, b = int(whole.offsets[e]), int(whole.offsets[e + 1])
        assert one.example_start == e and torch.equal(one.topk_ids, whole.topk_ids[a:b])
    seen = []
    for batch in reader.iter_batches(3, shards=[2, 0]):
        seen.extend(range(batch.example_start, batch.example_start + batch.num_examples))
        a = int(whole.offsets[batch.example_start])
        assert torch.equal(batch.topk_logprobs, whole.topk_logprobs[a : a + batch.num_positions])
    assert seen == [8, 9, 10, 11, 0, 1, 2, 3]
    with pytest.raises(IndexError):
        reader.example(17)


def test_tempered_view_matches_dense_reference(backend, store_url):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(12, V, generator=g, dtype=torch.float64) * 3
    from distill.storage import topk_labels

    labels = topk_labels(logits, K, temperatures=(2.0,))
    write_store(store_url, labels, backend=backend, per_shard=12)
    back = open_store(store_url).read_all()
    lp_t, tail_t = back.tempered(2.0)
    dense = torch.log_softmax(logits / 2.0, 1)  # (P, V) float64 reference
    assert torch.allclose(lp_t.double(), dense.gather(1, back.topk_ids), atol=1e-5)
    outside = dense.scatter(1, back.topk_ids, float("-inf")).logsumexp(1)
    assert torch.allclose(tail_t.double(), outside, atol=1e-4)
    with pytest.raises(ValueError, match="holds 1.0, 2.0"):
        back.tempered(3.0)


def test_half_written_shard_is_pending_and_rewrite_is_safe(backend, tmp_path, monkeypatch):
    url = str(tmp_path / "s")
    labels = make_labels("topk", n_examples=10)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=5, temperatures=(1, 2, 4),
                     value_encoding="lossless", backend=backend)
    writer = create_store(url, spec)
    writer.write_shard(0, labels.examples(0, 5))
    real_write, calls = StoreFS.write, []

    def crash_on_second_file(self, rel, data, atomic=True):
        calls.append(rel)
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real_write(self, rel, data, atomic)

    monkeypatch.setattr(StoreFS, "write", crash_on_second_file)
    with pytest.raises(OSError):
        writer.write_shard(1, labels.examples(5, 10))
    monkeypatch.undo()
    assert (tmp_path / "s" / shard_dir(1)).exists()  # partial files are there...
    reader = open_store(url)
    assert reader.complete_shards() == [0] and not reader.complete  # ...but not complete
    with pytest.raises(StoreError, match="not complete"):
        reader.read_shard(1)
    with pytest.raises(StoreError, match="not complete"):
        writer.finalize()
    resumed = create_store(url, spec)
    assert resumed.pending_shards() == [1]
    resumed.write_shard(1, labels.examples(5, 10))
    resumed.finalize()
    assert torch.equal(open_store(url).read_all().topk_ids, by_id(labels)[0])


def test_every_flipped_byte_of_a_shard_is_caught(backend, tmp_path):
    url = tmp_path / "s"
    labels = make_labels("topk", n_examples=10)
    write_store(url, labels, backend=backend)
    files = sorted(p for p in (url / shard_dir(1)).rglob("*") if p.is_file())
    assert files
    g = torch.Generator().manual_seed(0)
    for path in files:
        original = path.read_bytes()
        for _ in range(3):
            pos = int(torch.randint(len(original), (1,), generator=g))
            damaged = bytearray(original)
            damaged[pos] ^= 1 << int(torch.randint(8, (1,), generator=g))
            path.write_bytes(bytes(damaged))
            reader = open_store(str(url))
            with pytest.raises(CorruptStoreError, match="shard 1") as err:
                reader.read_shard(1)
            assert err.value.shard == 1
            assert [d["shard"] for d in reader.verify()] == [1]
            reader.read_shard(0)  # other shards stay readable
        path.write_bytes(original)
    assert open_store(str(url)).verify() == []


def test_truncated_or_missing_file_is_caught(backend, tmp_path):
    url = tmp_path / "s"
    write_store(url, make_labels("topk", n_examples=10), backend=backend)
    path = sorted(p for p in (url / shard_dir(0)).rglob("*") if p.is_file())[-1]
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(CorruptStoreError, match="shard 0"):
        open_store(str(url)).read_shard(0)
    path.unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        open_store(str(url)).read_shard(0)


def test_damaged_manifest_and_commit_records(backend, tmp_path):
    url = tmp_path / "s"
    write_store(url, make_labels("topk", n_examples=10), backend=backend, finalize=False)
    record = url / commit_path(0)
    text = record.read_text()
    record.write_text(text.replace('"positions": ', '"positions": 1'))
    with pytest.raises(CorruptStoreError, match="checksum"):
        open_store(str(url))
    record.write_text(text)
    manifest = url / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"k": 8', '"k": 9'))
    with pytest.raises(CorruptStoreError, match="manifest.json"):
        open_store(str(url))
    manifest.write_text("{not json")
    with pytest.raises(CorruptStoreError, match="not valid JSON"):
        open_store(str(url))
    manifest.unlink()
    with pytest.raises(StoreError, match="no manifest.json"):
        open_store(str(url))


def test_newer_format_version_is_refused(tmp_path):
    from distill.storage.manifest import dumps_checked

    url = tmp_path / "s"
    write_store(url, make_labels("topk", n_examples=4))
    doc = json.loads((url / "manifest.json").read_text())
    doc["format_version"] = 99
    (url / "manifest.json").write_bytes(dumps_checked(doc))
    with pytest.raises(IncompatibleStoreError, match="upgrade distill"):
        open_store(str(url))


def test_commit_record_pointing_outside_the_store_is_refused(tmp_path):
    from distill.storage.manifest import dumps_checked

    url = tmp_path / "s"
    write_store(url, make_labels("topk", n_examples=4), per_shard=4, finalize=False)
    doc = json.loads((url / commit_path(0)).read_text())
    doc["files"] = {"../../../etc/passwd": {"bytes": 1, "crc32": "00000000"}}
    (url / commit_path(0)).write_bytes(dumps_checked(doc))
    with pytest.raises(CorruptStoreError, match="outside the store"):
        open_store(str(url)).read_shard(0)


def test_reopen_resumes_same_spec_and_refuses_another(backend, tmp_path):
    url = str(tmp_path / "s")
    labels = make_labels("topk", n_examples=10)
    writer = write_store(url, labels, backend=backend, finalize=False)
    spec = writer.spec
    assert create_store(url, spec).pending_shards() == []
    other = StoreSpec(**{**spec.__dict__, "dataset_fingerprint": "data-b"})
    with pytest.raises(IncompatibleStoreError, match="dataset_fingerprint"):
        create_store(url, other)
    fresh = create_store(url, other, overwrite=True)
    assert fresh.pending_shards() == [0, 1]


def test_paths_that_are_not_stores_are_refused(tmp_path):
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=3)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        create_store(str(tmp_path / "file"), spec)
    with pytest.raises(StoreError, match="is a file"):
        open_store(str(tmp_path / "file"))
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "precious.txt").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        create_store(str(tmp_path / "dir"), spec)
    with pytest.raises(StoreError, match="not a distill store"):
        create_store(str(tmp_path / "dir"), spec, overwrite=True)
    with pytest.raises(StoreError, match="no store"):
        open_store(str(tmp_path / "missing"))


def test_spec_validation():
    with pytest.raises(StoreError, match="k=0"):
        StoreSpec("topk", k=0, vocab_size=V, num_examples=1)
    with pytest.raises(StoreError, match="k=301"):
        StoreSpec("topk", k=301, vocab_size=V, num_examples=1)
    with pytest.raises(StoreError, match="temperatures"):
        StoreSpec("topk", k=2, vocab_size=V, num_examples=1, temperatures=(0.0,))
    with pytest.raises(StoreError, match="unknown backend"):
        StoreSpec("topk", k=2, vocab_size=V, num_examples=1, backend="hdf5")
    with pytest.raises(StoreError, match="value encoding"):
        StoreSpec("topk", k=2, vocab_size=V, num_examples=1, value_encoding="fp8")


def test_writer_refuses_labels_that_do_not_fit(tmp_path):
    labels = make_labels("topk", n_examples=10)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=5, temperatures=(1, 2, 4))
    writer = create_store(str(tmp_path / "s"), spec)
    with pytest.raises(StoreError, match="got 4 examples"):
        writer.write_shard(0, labels.examples(0, 4))
    small = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=5, temperatures=(1, 2))
    with pytest.raises(StoreError, match="normalisers"):
        create_store(str(tmp_path / "t"), small).write_shard(0, labels.examples(0, 5))


def _write_shard_in_process(url, spec_json, index, seed):
    from distill.storage.manifest import StoreSpec as Spec

    spec = Spec.from_json(spec_json)
    labels = make_labels("topk", n_examples=10, seed=seed)
    a, b = spec.shard_range(index)
    create_store(url, spec).write_shard(index, labels.examples(a, b))


def test_two_processes_write_disjoint_shards(backend, tmp_path):
    import multiprocessing as mp

    url = str(tmp_path / "s")
    labels = make_labels("topk", n_examples=10, seed=5)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=5, temperatures=(1, 2, 4),
                     value_encoding="lossless", backend=backend)
    create_store(url, spec)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shard_in_process, args=(url, spec.to_json(), i, 5)) for i in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    create_store(url, spec).finalize()
    assert torch.equal(open_store(url).read_all().topk_ids, by_id(labels)[0])


def test_summary_figures(backend, store_url):
    labels = make_labels("topk", n_examples=10)
    write_store(store_url, labels, backend=backend, encoding="sqrt")
    s = open_store(store_url).summary()
    assert s["examples"] == 10 and s["positions"] == labels.num_positions and s["k"] == K
    assert s["shards_complete"] == s["shards_total"] == 2 and s["finalized"]
    assert s["bytes_per_entry"] == pytest.approx(s["payload_bytes"] / (labels.num_positions * K))
    mass = float((1 - labels.tail_logprob.double().exp()).mean())
    assert s["topk_mass_mean"] == pytest.approx(mass, rel=1e-6)  # from the commit records' statistics
    read = open_store(store_url).summary(verify=True)  # every shard read and checked
    assert read["topk_mass_mean"] == pytest.approx(mass, rel=1e-3) and read["shards_unreadable"] == []
    assert s["temperatures"] == [1.0, 2.0, 4.0] and s["value_encoding"]["name"] == "sqrt"


def test_empty_shards_and_empty_examples(backend, tmp_path):
    labels = make_labels("topk", n_examples=6)
    empty = labels.examples(0, 0)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=0, temperatures=(1, 2, 4), backend=backend)
    writer = create_store(str(tmp_path / "s"), spec)
    writer.write_shard(0, empty)
    writer.finalize()
    assert open_store(str(tmp_path / "s")).read_all().num_positions == 0


@pytest.mark.parametrize("step", [3, 1])  # 1: ten appends, so the writer compacts its batches along the way
def test_shard_writer_appends_batches(backend, tmp_path, step):
    labels = make_labels("topk", n_examples=10)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=10, temperatures=(1, 2, 4),
                     value_encoding="lossless", backend=backend)
    shard = create_store(str(tmp_path / "s"), spec).shard(0)
    for a in range(0, 10, step):
        shard.append(labels.examples(a, min(a + step, 10)))
    assert shard.num_examples == 10
    record = shard.commit()
    assert record.positions == labels.num_positions
    back = open_store(str(tmp_path / "s")).read_all()
    assert torch.equal(back.offsets, labels.offsets) and torch.equal(back.topk_ids, by_id(labels)[0])


def test_rewriting_a_shard_of_a_finalized_store_unseals_it(backend, tmp_path):
    url = str(tmp_path / "s")
    writer = write_store(url, make_labels("topk", n_examples=10), backend=backend)
    other = make_labels("topk", n_examples=10, seed=9)
    writer.write_shard(1, other.examples(5, 10))
    reader = open_store(url)
    assert not reader.manifest.finalized and reader.complete_shards() == [0, 1]
    assert torch.equal(reader.read_shard(1).topk_ids, by_id(other.examples(5, 10))[0])
    create_store(url, writer.spec).finalize()
    assert open_store(url).manifest.finalized and open_store(url).verify() == []


def test_shard_writer_grows_past_what_its_first_batch_suggests(backend, tmp_path):
    """The first batch has one position per example, the rest four: the shard's buffers double on the way."""
    from distill.storage import topk_labels
    from distill.storage.synthetic import zipf_logits

    lengths = torch.tensor([1, 1, 4, 4, 4, 4, 4, 4, 4, 4])
    g = torch.Generator().manual_seed(11)
    labels = topk_labels(zipf_logits(int(lengths.sum()), V, g), K, (2.0,), lengths=lengths)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=10, temperatures=(1, 2),
                     value_encoding="lossless", backend=backend)
    shard = create_store(str(tmp_path / "s"), spec).shard(0)
    for a, b in [(0, 2), (2, 5), (5, 10)]:
        shard.append(labels.examples(a, b))
    assert shard.commit().positions == labels.num_positions == 34
    back = open_store(str(tmp_path / "s")).read_all()
    assert torch.equal(back.offsets, labels.offsets) and torch.equal(back.topk_ids, by_id(labels)[0])


def test_shard_writer_holds_ids_as_int32_and_refuses_an_id_that_would_wrap(backend, tmp_path):
    labels = make_labels("topk", n_examples=10)
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, examples_per_shard=10, temperatures=(1, 2, 4),
                     value_encoding="lossless", backend=backend)
    shard = create_store(str(tmp_path / "s"), spec).shard(0)
    shard.append(labels.examples(0, 5))
    assert shard._buffers["topk_ids"].dtype == torch.int32  # half of topk's int64 while the shard fills
    bad = labels.examples(5, 10)
    bad.topk_ids = bad.topk_ids.clone()
    bad.topk_ids[0, 0] = 2**32 + 1  # as int32 this would read 1, inside the vocabulary
    with pytest.raises(StoreError, match="shard 0: topk_ids outside the vocabulary"):
        shard.append(bad)
    shard = create_store(str(tmp_path / "s"), spec).shard(0)
    shard.append(labels.examples(0, 5))
    shard.append(labels.examples(5, 10))
    shard.commit()
    back = open_store(str(tmp_path / "s")).read_all()
    assert back.topk_ids.dtype == torch.int64 and torch.equal(back.topk_ids, by_id(labels)[0])
