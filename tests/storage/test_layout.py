"""The store's layout module, the task field, the shared statistics, atomic writes and the choice lists."""

import json
import os

import pytest

from distill.errors import StoreError, WriteError
from distill.storage import (BACKENDS, METHODS, VALUE_ENCODINGS, StoreSpec, ValueEncoding, create_store, empty_labels,
                             open_store)
from distill.storage.backend import get_backend
from distill.storage.fs import write_atomic
from distill.storage.layout import commit_index, commit_name, commit_path
from distill.storage.manifest import dumps_checked

from storehelp import K, V, make_labels, write_store


def test_task_is_a_typed_field_kept_inside_extra_on_disk(tmp_path):
    spec = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, extra={"task": "causal-lm", "seed": 1})
    assert spec.task == "causal-lm" and spec.extra == {"seed": 1}  # an old caller's extra["task"] moves to the field
    assert spec == StoreSpec("topk", k=K, vocab_size=V, num_examples=10, extra={"seed": 1}, task="causal-lm")
    create_store(str(tmp_path / "s"), spec)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert "task" not in manifest and manifest["extra"] == {"seed": 1, "task": "causal-lm"}  # format version 1
    back = open_store(str(tmp_path / "s")).spec
    assert back.task == "causal-lm" and back.extra == {"seed": 1} and back == spec
    with pytest.raises(StoreError, match="disagree"):
        StoreSpec("topk", k=K, vocab_size=V, num_examples=10, extra={"task": "causal-lm"}, task="classification")


def test_commit_record_names_and_indices_invert_each_other():
    for index in (0, 7, 123456):
        assert commit_index(commit_name(index)) == index and commit_path(index) == f"shards/{commit_name(index)}"
    assert commit_name(7) == "000007.commit.json" and commit_index("stray.commit.json") == -1


def test_summary_reads_shards_for_records_without_statistics(tmp_path):
    url = tmp_path / "s"
    write_store(url, make_labels("topk", n_examples=10), finalize=False)  # lossless: the tail reads back exactly
    with_stats = open_store(str(url)).summary()["topk_mass_mean"]
    for index in (0, 1):  # the format allows records without stats
        doc = json.loads((url / commit_path(index)).read_text())
        doc.pop("stats")
        (url / commit_path(index)).write_bytes(dumps_checked(doc))
    assert open_store(str(url)).summary()["topk_mass_mean"] == with_stats  # the same function, the same bits


def test_write_atomic_replaces_the_file_whole_or_raises_one_line(tmp_path):
    path = tmp_path / "new" / "summary.json"
    write_atomic(str(path), '{"a": 1}\n')
    write_atomic(str(path), b"second")
    assert path.read_bytes() == b"second" and os.listdir(path.parent) == ["summary.json"]
    (tmp_path / "dir.json").mkdir()  # os.replace onto a directory fails
    with pytest.raises(WriteError, match=r"^cannot write the report \(") as e:
        write_atomic(str(tmp_path / "dir.json"), b"x", "the report")
    assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path)) == ["dir.json", "new"]  # no temporary left


def test_choice_lists_are_what_the_store_accepts():
    assert METHODS[0] == "topk" and BACKENDS[0] == "zarr" and VALUE_ENCODINGS == ("sqrt", "lossless")
    for name in BACKENDS:
        assert get_backend(name).name == name
    for name in VALUE_ENCODINGS:
        assert ValueEncoding.named(name).name == name
    for method in METHODS:
        StoreSpec(method, k=K, vocab_size=V, num_examples=1)
    with pytest.raises(ValueError, match="zarr, parquet"):
        get_backend("hdf5")


@pytest.mark.parametrize("method", ["topk", "sample"])
def test_empty_labels_fill_a_shard_of_examples_without_positions(tmp_path, method):
    spec = StoreSpec(method, k=K, vocab_size=V, num_examples=3, temperatures=(1, 2), has_token_index=True)
    labels = empty_labels(spec, 3)
    assert labels.offsets.tolist() == [0, 0, 0, 0] and labels.num_positions == 0
    create_store(str(tmp_path / "s"), spec).write_shard(0, labels)
    back = open_store(str(tmp_path / "s")).read_shard(0)
    assert back.num_examples == 3 and back.num_positions == 0 and back.temperatures == (2.0,)


def test_a_store_resumes_whatever_it_records_about_the_data_but_not_other_settings():
    from distill.errors import IncompatibleStoreError

    old = StoreSpec("topk", k=K, vocab_size=V, num_examples=10, extra={"seed": 1})
    described = StoreSpec("topk", k=K, vocab_size=V, num_examples=10,
                          extra={"seed": 1, "seq_len": 64, "data": {"documents": 3, "sequences": 10}})
    old.check_same(described)  # a store made before the data was described: the fingerprint pins the data
    described.check_same(old)
    with pytest.raises(IncompatibleStoreError, match="extra"):
        old.check_same(StoreSpec("topk", k=K, vocab_size=V, num_examples=10, extra={"seed": 2}))


def test_the_zarr_reader_refuses_metadata_it_did_not_write_even_after_reading_good_metadata():
    """Parsed zarr.json files are cached by their bytes: an edited one is parsed and refused on its own, each problem
    with its own message, and the good one still decodes (and is not confused with an array of another name)."""
    import numpy as np

    zarr = get_backend("zarr")
    columns = {"tail_logprob": np.arange(6, dtype=np.float32), "counts": np.ones((3, 2), np.uint8)}
    files = zarr.serialize(columns)
    for _ in range(2):  # the second time from the cache
        out = zarr.deserialize(files, {"tail_logprob": (6,), "counts": (3, 2)})
        assert out["tail_logprob"].tolist() == list(range(6)) and out["counts"].tolist() == [[1, 1]] * 3
    meta = json.loads(files["tail_logprob/zarr.json"])
    edits = [
        ("not laid out as distill writes it", lambda m: m["codecs"][1].update(name="gzip")),
        ("data type 'float64'", lambda m: m.update(data_type="float64")),
        ("not laid out as distill writes it", lambda m: m.update(shape=[6.0])),  # its chunk shape still matches
    ]
    for message, edit in edits:
        bad = json.loads(json.dumps(meta))
        edit(bad)
        with pytest.raises(ValueError, match=message):
            zarr.deserialize({**files, "tail_logprob/zarr.json": json.dumps(bad).encode()})
    with pytest.raises(ValueError, match=r"shape \[6\], the commit record implies \[7\]"):
        zarr.deserialize(files, {"tail_logprob": (7,)})
    with pytest.raises(ValueError, match="not an object"):
        zarr.deserialize({**files, "tail_logprob/zarr.json": b"[1, 2]"})
    renamed = {k.replace("tail_logprob", "other"): v for k, v in files.items() if k.startswith("tail_logprob")}
    assert zarr.deserialize(renamed)["other"].tolist() == list(range(6))
