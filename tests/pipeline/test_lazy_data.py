"""Data read lazily: every source kind loads into temporary files, in batches, and gives the
items, batches and fingerprint that the whole arrays in memory give (the old, eager way)."""

import gc
import json
import os
import pickle

import numpy as np
import pytest
import torch

from datahelp import (CHATML_TEMPLATE, SENTENCES, make_chat_tokenizer, make_hf_tokenizer, save_hf_dataset,
                      write_jsonl, write_module, write_parquet, write_text)
from distill.pipeline import lazytables
from distill.pipeline.chat import chat_documents
from distill.pipeline.data import DataConfig, load_data
from distill.pipeline.diskarrays import ArrayWriter
from distill.pipeline.documents import documents_to_sequences, write_sequences
from distill.pipeline.examples import ExampleSet
from distill.pipeline.fingerprint import Fingerprint
from distill.pipeline.tokenize import load_tokenizer

TEXTS = [s * k for k, s in enumerate(SENTENCES * 2, 1)]  # 8 documents of 22 to 280 characters
CONVERSATIONS = [[{"role": "user", "content": f"hello {s}"}, {"role": "assistant", "content": s * (k % 3 + 1)}]
                 for k, s in enumerate(SENTENCES * 2)]
FLAGS = [dict(seq_len=16), dict(seq_len=16, stride=5), dict(seq_len=16, pack=True), dict(seq_len=9, limit=7),
         dict(seq_len=12, pack=True, limit=5)]


@pytest.fixture(autouse=True)
def small_batches(monkeypatch):
    monkeypatch.setattr(lazytables, "ROWS_PER_BATCH", 3)  # several batches from a few rows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return str(make_hf_tokenizer(tmp_path_factory.mktemp("tok"), eos_token="[EOS]"))


def old_fingerprint(task, ids, lengths, mask=None, position_ids=None):
    """ExampleSet.fingerprint as it was computed when every array was an int64 / bool tensor in memory."""
    fp = Fingerprint("dataset").text("task", task)
    fp.tensor("lengths", np.asarray(lengths, np.int64)).tensor("input_ids", torch.tensor(ids, dtype=torch.int64))
    if mask is not None:
        fp.tensor("position_mask", torch.tensor(mask, dtype=torch.bool))
    if position_ids is not None:
        fp.tensor("position_ids", torch.tensor(position_ids, dtype=torch.int64))
    return fp.hexdigest()


def eager(documents, flags, eos_id, vocab_size):
    """The reference: all documents cut at once, in memory; (ExampleSet, old fingerprint)."""
    ids = np.concatenate([d for d, _ in documents])
    mask = None if documents[0][1] is None else np.concatenate([m for _, m in documents])
    out = documents_to_sequences(ids, [len(d) for d, _ in documents], flags["seq_len"], position_mask=mask,
                                 stride=flags.get("stride", 0), pack=flags.get("pack", False), eos_id=eos_id,
                                 limit=flags.get("limit"))
    data = ExampleSet("causal-lm", input_ids=out.input_ids, lengths=out.lengths, position_mask=out.position_mask,
                      position_ids=out.position_ids, vocab_size=vocab_size, stats=out.stats)
    return data, old_fingerprint("causal-lm", out.input_ids, out.lengths, out.position_mask, out.position_ids)


def assert_same(lazy, reference, fingerprint):
    assert lazy.on_disk() and not reference.on_disk()
    assert len(lazy) == len(reference) and lazy.stats == reference.stats and lazy.packed == reference.packed
    for i in range(len(lazy)):
        got, want = lazy[i], reference[i]
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (i, key)
    got, want = lazy.collate([lazy[i] for i in range(3)]), reference.collate([reference[i] for i in range(3)])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
                                             for k in want)
    assert lazy.fingerprint() == reference.fingerprint() == fingerprint


def text_documents(tokenizer):
    tok = load_tokenizer(tokenizer)
    return [(np.asarray(tok.encode(t), np.int64), None) for t in TEXTS]


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
@pytest.mark.parametrize("kind", ["text-files", "jsonl", "parquet-text", "datasets", "callable"])
def test_text_sources_match_the_eager_arrays(kind, flags, tokenizer, tmp_path, monkeypatch):
    if kind == "text-files":
        for k, text in enumerate(TEXTS):
            write_text(tmp_path / "d" / f"{k:02d}.txt", text)
        spec = tmp_path / "d"
    elif kind == "jsonl":
        spec = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    elif kind == "parquet-text":
        spec = write_parquet(tmp_path / "t.parquet", {"text": TEXTS})
    elif kind == "datasets":
        spec = save_hf_dataset(tmp_path / "ds", {"text": TEXTS})
    else:
        spec = write_module(tmp_path, "lazy_texts", f"def data(split):\n    return [{{'text': t}} for t in {TEXTS!r}]\n",
                            monkeypatch) + ":data"
    lazy = load_data(DataConfig(str(spec), task="causal-lm", tokenizer=tokenizer, **flags))
    tok = load_tokenizer(tokenizer)
    documents = text_documents(tokenizer)
    if kind != "text-files":  # a table's --limit reads only its first rows too
        documents = documents[:flags.get("limit")]
    assert_same(lazy, *eager(documents, flags, tok.eos_id, tok.vocab_size))


@pytest.mark.parametrize("flags", FLAGS[:3], ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()))
def test_parquet_ids_with_hf_labels_match_the_eager_arrays(flags, tokenizer, tmp_path):
    """Token ids as given, int32 on disk, int64 in items; masks from a labels column."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 300, n) for n in rng.integers(2, 40, 11)]
    labels = [np.where(rng.random(len(r)) < 0.3, -100, r) for r in rows]
    spec = write_parquet(tmp_path / "ids.parquet", {"input_ids": [r.tolist() for r in rows],
                                                     "labels": [x.tolist() for x in labels]})
    lazy = load_data(DataConfig(str(spec), tokenizer=tokenizer, **flags))
    masks = []
    for x in labels:
        m = np.zeros(len(x), bool)
        m[:-1] = x[1:] != -100
        masks.append(m)
    tok = load_tokenizer(tokenizer)
    assert_same(lazy, *eager(list(zip(rows, masks)), flags, tok.eos_id, tok.vocab_size))
    assert lazy.on_disk()[0].dtype == np.int32  # the ids: half of int64


def test_chat_matches_the_eager_arrays(tmp_path):
    tok_dir = str(make_chat_tokenizer(tmp_path / "tok"))
    spec = write_jsonl(tmp_path / "chat.jsonl", [{"messages": json.dumps(c)} for c in CONVERSATIONS])
    flags = dict(seq_len=24, stride=4)
    lazy = load_data(DataConfig(str(spec), tokenizer=tok_dir, **flags))
    tok = load_tokenizer(tok_dir)
    ids, lengths, mask = chat_documents(CONVERSATIONS, tok, CHATML_TEMPLATE, "assistant", "chat")
    cuts = np.cumsum(lengths)[:-1]
    reference, fingerprint = eager(list(zip(np.split(ids, cuts), np.split(mask, cuts))), flags, None, tok.vocab_size)
    reference.stats["chat"] = lazy.stats["chat"]
    assert_same(lazy, reference, fingerprint)


def test_classification_ids_and_features_on_disk_match(tmp_path):
    rng = np.random.default_rng(1)
    rows = [rng.integers(0, 50, n).tolist() for n in rng.integers(1, 9, 10)]
    spec = write_parquet(tmp_path / "c.parquet", {"input_ids": rows, "label": list(range(10))})
    lazy = load_data(DataConfig(str(spec)))
    flat = np.concatenate(rows)
    reference = ExampleSet("classification", input_ids=flat, lengths=[len(r) for r in rows], labels=range(10))
    assert [lazy[i]["input_ids"].tolist() for i in range(10)] == rows
    assert all(torch.equal(lazy[i]["labels"], reference[i]["labels"]) for i in range(10))
    assert lazy.fingerprint() == reference.fingerprint() == old_fingerprint("classification", flat, [len(r) for r in rows])
    x = rng.standard_normal((10, 5)).astype(np.float32)
    lazy = load_data(DataConfig(str(write_parquet(tmp_path / "f.parquet", {"inputs": x.tolist(), "label": list(range(10))}))))
    assert lazy.on_disk()[0].shape == (10, 5)
    assert all(torch.equal(lazy[i]["inputs"], torch.from_numpy(x[i])) for i in range(10))
    assert lazy.fingerprint() == Fingerprint("dataset").text("task", "classification").tensor(
        "inputs", torch.from_numpy(x)).hexdigest()


def test_arrays_are_unnamed_files_removed_with_the_set(tmp_path):
    spec = write_parquet(tmp_path / "ids.parquet", {"input_ids": [list(range(50))] * 20})
    data = load_data(DataConfig(str(spec), task="causal-lm", seq_len=8, stride=2))
    files = {array.fileno: os.fstat(array.fileno) for array in data.on_disk()}
    assert len(files) == 2  # ids and the position mask (stride); no position ids: not packed
    assert [s.st_size for s in files.values()] == [array.nbytes for array in data.on_disk()]  # not a heap copy
    for fd in files:  # no name: nothing is left behind, whatever ends the process
        link = os.readlink(f"/proc/self/fd/{fd}")
        assert link.endswith("(deleted)") or "#" in link, link
    head = data.head(3)
    assert [head[i]["input_ids"].tolist() for i in range(3)] == [data[i]["input_ids"].tolist() for i in range(3)]
    del data, head
    gc.collect()
    for fd, stat in files.items():  # closed with the set (the number may since name another file)
        try:
            assert (os.fstat(fd).st_ino, os.fstat(fd).st_dev) != (stat.st_ino, stat.st_dev)
        except OSError:
            pass


def test_forked_dataloader_workers_read_the_files(tmp_path):
    spec = write_parquet(tmp_path / "ids.parquet", {"input_ids": [list(range(k, k + 30)) for k in range(40)]})
    data = load_data(DataConfig(str(spec), task="causal-lm", seq_len=16))
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=data.collate, num_workers=2,
                                         multiprocessing_context="fork")
    batches = list(loader)
    assert all(torch.equal(b["input_ids"], data.collate([data[i] for i in range(8 * k, min(8 * k + 8, len(data)))])
                           ["input_ids"]) for k, b in enumerate(batches))


def test_writer_widens_ids_past_int32_and_disk_array_slices():
    writer = ArrayWriter(np.int32)
    writer.append(np.arange(5))
    writer.append(np.array([2**40, 7]))
    a = writer.finish()
    assert a.dtype == np.int64 and np.array_equal(a[:], [0, 1, 2, 3, 4, 2**40, 7])
    assert np.array_equal(a[2:4], [2, 3]) and a[-1] == 7 and len(a[5:3]) == 0
    assert np.array_equal(np.concatenate(list(a.chunks(16))), a[:])
    copy = pickle.loads(pickle.dumps(a.head(6)))  # what a spawned worker gets: the values, in its own file
    assert copy.fileno != a.fileno and copy.dtype == a.dtype and np.array_equal(copy[:], a[:6])


def test_write_sequences_matches_documents_to_sequences_on_random_cuts():
    rng = np.random.default_rng(2)
    for _ in range(150):
        lengths = rng.integers(0, 20, int(rng.integers(1, 10)))
        ids = rng.integers(0, 300, int(lengths.sum()))
        mask = rng.random(len(ids)) < 0.7 if rng.random() < 0.4 else None
        seq_len, pack = int(rng.integers(2, 9)), bool(rng.random() < 0.5)
        flags = dict(stride=0 if pack else int(rng.integers(0, seq_len)), pack=pack, eos_id=999,
                     limit=int(rng.integers(0, 10)) if rng.random() < 0.3 else None)
        want = documents_to_sequences(ids, lengths, seq_len, position_mask=mask, **flags)
        bounds = [0, *sorted(rng.integers(0, len(lengths) + 1, 2)), len(lengths)]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        batches = [(ids[offsets[a]:offsets[b]], lengths[a:b], None if mask is None else mask[offsets[a]:offsets[b]])
                   for a, b in zip(bounds, bounds[1:])]
        got = write_sequences(batches, seq_len, **flags)
        assert got.stats == want.stats and np.array_equal(got.lengths, want.lengths)
        for name in ("input_ids", "position_mask", "position_ids"):
            w, g = getattr(want, name), getattr(got, name)
            assert (w is None) == (g is None) and (w is None or np.array_equal(np.asarray(g), w)), name
