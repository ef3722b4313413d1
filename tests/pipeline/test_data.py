import random

import numpy as np
import pytest
import torch

from datahelp import (MNIST1D_SMALL, SENTENCES, make_hf_tokenizer, save_hf_dataset, write_jsonl, write_module,
                      write_parquet, write_text)
from distill.errors import ConfigError
from distill.pipeline.data import DataConfig, ExampleSet, load_data
from distill.pipeline.tokenize import ByteTokenizer, load_tokenizer

IDS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
LABELS = [2, 0, 1]


def load(spec, **kw) -> ExampleSet:
    return load_data(DataConfig(str(spec), **kw))


def items(data: ExampleSet) -> list[dict]:
    return [data[i] for i in range(len(data))]


def ids_of(data: ExampleSet) -> list[list[int]]:
    return [data[i]["input_ids"].tolist() for i in range(len(data))]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def ids_parquet(tmp_path):
    return write_parquet(tmp_path / "train.parquet", {"input_ids": IDS, "label": LABELS})


# --- config ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(task="regression"), dict(seq_len=1), dict(seq_len=2.5), dict(limit=0),
                                dict(limit=True), dict(split=""), dict(spec="")])
def test_config_rejects_bad_values(kw):
    with pytest.raises(ConfigError):
        DataConfig(**{"spec": "mnist1d", **kw})


# --- mnist1d -----------------------------------------------------------------------------


def test_mnist1d_shapes_splits_and_items():
    train, test = load(MNIST1D_SMALL), load(MNIST1D_SMALL, split="test")
    assert (len(train), len(test)) == (160, 40)
    assert train.task == "classification" and train.num_classes == 10 and train.vocab_size is None
    assert train.num_features == 40 and not train.has_position_mask
    item = train[0]
    assert item["inputs"].shape == (40,) and item["inputs"].dtype == torch.float32
    assert item["labels"].shape == () and item["labels"].dtype == torch.int64
    batch = train.collate([train[0], train[1], train[-1]])
    assert batch["inputs"].shape == (3, 40) and batch["labels"].shape == (3,)
    assert set(batch) == {"inputs", "labels"}


def test_mnist1d_matches_make_dataset_and_is_deterministic():
    import mnist1d.data

    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = 200, 7
    reference = mnist1d.data.make_dataset(args)
    a = load("mnist1d:num_samples=200,seed=7", split="test")
    torch.testing.assert_close(torch.stack([x["inputs"] for x in items(a)]),
                               torch.from_numpy(reference["x_test"]).float())
    assert [x["labels"].item() for x in items(a)] == reference["y_test"].tolist()
    assert a.fingerprint() == load("mnist1d:num_samples=200,seed=7", split="test").fingerprint()
    assert a.fingerprint() != load("mnist1d:num_samples=200,seed=8", split="test").fingerprint()
    assert a.fingerprint() != load("mnist1d:num_samples=200,seed=7").fingerprint()  # the other split


def test_mnist1d_restores_global_random_state():
    random.seed(1)
    np.random.seed(1)
    expected = (random.random(), np.random.random())
    random.seed(1)
    np.random.seed(1)
    load("mnist1d:num_samples=100,seed=1234")  # options not generated before: not cached
    assert (random.random(), np.random.random()) == expected


@pytest.mark.parametrize("spec, split, message", [
    ("mnist1d:colour=3", "train", "valid options: "),
    ("mnist1d:num_samples=1.5", "train", "must be a int"),
    ("mnist1d:num_samples=5", "train", "num_samples >= 10"),
    ("mnist1d:num_samples=200", "validation", "splits 'train' and 'test'"),
])
def test_mnist1d_errors(spec, split, message):
    with pytest.raises(ConfigError, match=message):
        load(spec, split=split)


def test_mnist1d_is_not_causal_lm():
    with pytest.raises(ConfigError, match="classification"):
        load(MNIST1D_SMALL, task="causal-lm")


# --- tables ------------------------------------------------------------------------------


def test_parquet_ids_and_labels(ids_parquet):
    data = load(ids_parquet)
    assert data.task == "classification" and data.num_classes == 3 and data.vocab_size is None
    assert ids_of(data) == IDS and [x["labels"].item() for x in items(data)] == LABELS
    assert data.lengths.tolist() == [3, 2, 4]
    batch = data.collate(items(data))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == LABELS and batch["attention_mask"].dtype == torch.int64


def test_parquet_directory_is_read_in_name_order(tmp_path):
    write_parquet(tmp_path / "d" / "part-1.parquet", {"input_ids": IDS[1:], "label": LABELS[1:]})
    write_parquet(tmp_path / "d" / "part-0.parquet", {"input_ids": IDS[:1], "label": LABELS[:1]})
    assert ids_of(load(tmp_path / "d")) == IDS


def test_split_files_in_a_directory(tmp_path):
    write_parquet(tmp_path / "train.parquet", {"input_ids": IDS, "label": LABELS})
    write_jsonl(tmp_path / "test.jsonl", [{"input_ids": [1, 2], "label": 1}])
    write_parquet(tmp_path / "validation" / "x.parquet", {"input_ids": [[3, 4]], "label": [0]})
    assert ids_of(load(tmp_path)) == IDS
    assert ids_of(load(tmp_path, split="test")) == [[1, 2]]
    assert ids_of(load(tmp_path, split="validation")) == [[3, 4]]
    with pytest.raises(ConfigError, match=r"no split 'dev' \(found: test, train, validation\)"):
        load(tmp_path, split="dev")


@pytest.mark.parametrize("other", ["test", "validation", "valid", "val", "dev", "eval", "Test"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_directory_without_train_never_mixes_in_other_splits(tmp_path, other, suffix):
    for stem, ids in (("part-0", [1, 2]), (other, [3, 4])):
        if suffix == ".parquet":
            write_parquet(tmp_path / f"{stem}{suffix}", {"input_ids": [ids]})
        else:
            write_jsonl(tmp_path / f"{stem}{suffix}", [{"input_ids": ids}])
    with pytest.raises(ConfigError, match=rf"mix in other splits \({other}{suffix}\): pass --split NAME, "
                                          "or point --data at the file") as error:
        load(tmp_path, task="causal-lm")
    assert "\n" not in str(error.value)
    assert ids_of(load(tmp_path, split=other, task="causal-lm")) == [[3, 4]]
    assert ids_of(load(tmp_path / f"part-0{suffix}", task="causal-lm")) == [[1, 2]]


def test_text_directory_without_train_never_mixes_in_other_splits(tmp_path):
    write_text(tmp_path / "a.txt", "abc")
    write_text(tmp_path / "valid.txt", "xyz")
    with pytest.raises(ConfigError, match=r"mix in other splits \(valid.txt\)"):
        load(tmp_path, tokenizer="bytes")
    with pytest.raises(ConfigError, match=r"no split 'test' \(found: a, valid\)"):
        load(tmp_path, split="test", tokenizer="bytes")


def test_integer_labels_column_is_a_label_column(tmp_path):
    data = load(write_parquet(tmp_path / "t.parquet", {"input_ids": IDS, "labels": LABELS}))
    assert data.task == "classification" and [x["labels"].item() for x in items(data)] == LABELS


def test_text_split_files_in_a_directory(tmp_path):
    write_text(tmp_path / "train.txt", "abcdef")
    write_text(tmp_path / "test.txt", "xyz")
    assert ids_of(load(tmp_path, tokenizer="bytes")) == [list(b"abcdef")]
    assert ids_of(load(tmp_path, split="test", tokenizer="bytes")) == [list(b"xyz")]


def test_parquet_text_with_byte_tokenizer_truncates(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", {"text": ["hi", "héllo world"], "label": [1, 0]})
    data = load(path, tokenizer="bytes", seq_len=4)
    assert data.task == "classification" and data.vocab_size == 256
    assert ids_of(data) == [list(b"hi"), list("héllo".encode())[:4]]


def test_explicit_columns(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", {"toks": IDS, "cls": LABELS, "label": [9, 9, 9]})
    data = load(path, ids_column="toks", label_column="cls")
    assert ids_of(data) == IDS and [x["labels"].item() for x in items(data)] == LABELS


def test_jsonl_float_features_and_missing_labels(tmp_path):
    rows = [{"inputs": [0.5, 1.0, -2.0], "label": 1}, {"inputs": [1, 2, 3], "label": None}, {"inputs": [0, 0, 0.25]}]
    data = load(write_jsonl(tmp_path / "f.jsonl", rows))
    assert data.task == "classification" and data.num_features == 3 and data.num_classes == 2
    batch = data.collate(items(data))
    assert batch["inputs"].dtype == torch.float32
    assert batch["inputs"].tolist() == [[0.5, 1.0, -2.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.25]]
    assert batch["labels"].tolist() == [1, -1, -1]


def test_jsonl_with_types_pyarrow_cannot_infer_falls_back(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"input_ids": [1, 2], "label": 0}\n\n{"input_ids": [3], "label": 1, "note": {"a": 1}}\n'
                    '{"input_ids": [4], "label": 1, "note": "text"}\n')
    assert ids_of(load(path)) == [[1, 2], [3], [4]]


def test_hf_labels_give_position_masks(tmp_path):
    path = write_parquet(tmp_path / "lm.parquet", {
        "input_ids": [[1, 2, 3, 4], [5, 6]],
        "labels": [[-100, -100, 3, 4], [5, 6]],
    })
    data = load(path)
    assert data.task == "causal-lm" and data.has_position_mask
    assert data[0]["position_mask"].tolist() == [False, True, True, False]
    assert data[1]["position_mask"].tolist() == [True, False]
    assert "labels" not in data[0]
    batch = data.collate(items(data))
    assert batch["position_mask"].dtype == torch.bool
    assert batch["position_mask"].tolist() == [[False, True, True, False], [True, False, False, False]]


def test_position_mask_column_is_used_as_given(tmp_path):
    path = write_parquet(tmp_path / "lm.parquet", {"input_ids": [[1, 2, 3]], "position_mask": [[True, False, True]]})
    assert load(path)[0]["position_mask"].tolist() == [True, False, True]


def test_causal_lm_without_masks_keeps_every_token(ids_parquet):
    data = load(ids_parquet, task="causal-lm")
    assert not data.has_position_mask and "position_mask" not in data[0] and "labels" not in data[0]
    batch = data.collate(items(data))
    assert batch["position_mask"].tolist() == batch["attention_mask"].bool().tolist()


def test_limit_keeps_the_first_examples_and_all_classes(ids_parquet, tmp_path):
    data = load(ids_parquet, limit=2)
    assert ids_of(data) == IDS[:2] and data.num_classes == 3
    assert len(load(MNIST1D_SMALL, limit=5)) == 5
    assert load(ids_parquet, limit=100).fingerprint() == load(ids_parquet).fingerprint()


# --- datasets save_to_disk ---------------------------------------------------------------


def test_saved_dataset_reads_like_parquet(tmp_path, ids_parquet):
    saved = save_hf_dataset(tmp_path / "saved", {"input_ids": IDS, "label": LABELS, "text": ["a", "b", "c"]})
    data, reference = load(saved), load(ids_parquet)
    assert ids_of(data) == IDS and data.num_classes == 3
    assert data.fingerprint() == reference.fingerprint()
    assert [x["labels"].item() for x in items(data)] == LABELS
    with pytest.raises(ConfigError, match="is one split"):
        load(saved, split="test")


def test_saved_dataset_answers_to_the_split_it_was_saved_as(tmp_path):
    import datasets

    path = tmp_path / "test-split"
    datasets.Dataset.from_dict({"input_ids": IDS, "label": LABELS}, split="test").save_to_disk(str(path))
    assert ids_of(load(path, split="test")) == ids_of(load(path)) == IDS
    with pytest.raises(ConfigError, match=r"is one split \('test'\): pass --split train"):
        load(path, split="validation")


def test_saved_dataset_dict_splits(tmp_path):
    saved = save_hf_dataset(tmp_path / "dd", splits={
        "train": {"text": ["abc", "de"], "label": [0, 1]},
        "test": {"text": ["xyz"], "label": [1]},
    })
    assert ids_of(load(saved, tokenizer="bytes")) == [list(b"abc"), list(b"de")]
    assert ids_of(load(saved, split="test", tokenizer="bytes")) == [list(b"xyz")]
    with pytest.raises(ConfigError, match="pass --split with one of train, test"):
        load(saved, split="validation", tokenizer="bytes")


# --- text files --------------------------------------------------------------------------


@pytest.mark.parametrize("n, expected", [(23, [5, 5, 5, 5, 3]), (21, [5, 5, 5, 5, 1]), (22, [5, 5, 5, 5, 2]),
                                         (1, [1]), (5, [5])])
def test_cut_rule(tmp_path, n, expected):
    data = load(write_text(tmp_path / "c.txt", "x" * n), tokenizer="bytes", seq_len=5)
    assert data.lengths.tolist() == expected  # nothing dropped: a last piece of one token is kept


def test_text_file_is_cut_into_seq_len_sequences(tmp_path):
    text = "abcdefghijklmnopqrstuvw"  # 23 bytes
    data = load(write_text(tmp_path / "corpus.txt", text), tokenizer="bytes", seq_len=5)
    assert data.task == "causal-lm" and data.vocab_size == 256 and not data.has_position_mask
    assert data.lengths.tolist() == [5, 5, 5, 5, 3]
    assert sum(ids_of(data), []) == list(text.encode())
    batch = data.collate([data[0], data[4]])
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert batch["position_mask"].tolist() == [[True] * 5, [True, True, True, False, False]]


def test_text_directory_never_crosses_files(tmp_path):
    write_text(tmp_path / "b.txt", "wxyz")
    write_text(tmp_path / "a.txt", "abcdefg")
    write_text(tmp_path / "c.txt", "q")  # a single token: a sequence of its own
    write_text(tmp_path / "notes.md", "ignored")
    data = load(tmp_path, tokenizer="bytes", seq_len=5)
    assert ids_of(data) == [list(b"abcde"), list(b"fg"), list(b"wxyz"), list(b"q")]


def test_hf_tokenizer_directory(tmp_path, hf_tokenizer):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(hf_tokenizer), local_files_only=True)
    tok = load_tokenizer(str(hf_tokenizer))
    assert tok.vocab_size == len(reference)
    text = " ".join(SENTENCES * 3)
    expected = reference(text, add_special_tokens=False)["input_ids"]
    data = load(write_text(tmp_path / "c.txt", text), tokenizer=str(hf_tokenizer), seq_len=8)
    assert sum(ids_of(data), []) == expected
    assert data.lengths[:-1].eq(8).all()
    assert data.vocab_size == len(reference)
    # classification over a text column: special tokens ([BOS] here) are added, then truncated to seq_len
    table = write_parquet(tmp_path / "cls.parquet", {"text": SENTENCES[:2], "label": [0, 1]})
    cls = load(table, tokenizer=str(hf_tokenizer), seq_len=3)
    bos = reference.convert_tokens_to_ids("[BOS]")
    assert ids_of(cls) == [reference(s, truncation=True, max_length=3)["input_ids"] for s in SENTENCES[:2]]
    assert all(ids[0] == bos and len(ids) == 3 for ids in ids_of(cls))


def test_byte_tokenizer():
    tok = load_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 256
    assert tok.encode("hé") == [104, 195, 169]
    assert tok.encode_batch(["abc", "d"], max_length=2) == [[97, 98], [100]]


# --- package.module:function -------------------------------------------------------------


def test_function_returning_dicts_per_split(tmp_path, monkeypatch):
    module = write_module(tmp_path, "user_rows", """
        import torch

        def load(split):
            base = 0 if split == "train" else 100
            return [{"input_ids": torch.tensor([base + 1, base + 2]), "labels": torch.tensor(1)},
                    {"input_ids": [base + 3], "labels": 0}]
    """, monkeypatch)
    data = load(f"{module}:load")
    assert data.task == "classification" and ids_of(data) == [[1, 2], [3]] and data.num_classes == 2
    assert ids_of(load(f"{module}:load", split="test")) == [[101, 102], [103]]


def test_function_returning_tensor_dataset_of_tuples(tmp_path, monkeypatch):
    module = write_module(tmp_path, "user_tuples", """
        import torch

        def load(split="train"):
            g = torch.Generator().manual_seed(0)
            return torch.utils.data.TensorDataset(torch.randn(6, 4, generator=g), torch.arange(6) % 3)
    """, monkeypatch)
    data = load(f"{module}:load")
    g = torch.Generator().manual_seed(0)
    assert data.num_features == 4 and data.num_classes == 3
    torch.testing.assert_close(data.collate(items(data))["inputs"], torch.randn(6, 4, generator=g))


def test_function_returning_columns_and_lm_rows(tmp_path, monkeypatch):
    module = write_module(tmp_path, "user_columns", """
        import numpy as np

        def features():  # no split parameter: only the train split
            return {"inputs": np.arange(12, dtype=np.float32).reshape(3, 4), "label": [0, 1, 1]}

        def lm(split):
            return [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    """, monkeypatch)
    data = load(f"{module}:features")
    assert data.collate(items(data))["inputs"].tolist() == np.arange(12).reshape(3, 4).tolist()
    with pytest.raises(ConfigError, match="takes no split argument"):
        load(f"{module}:features", split="test")
    lm = load(f"{module}:lm")
    assert lm.task == "causal-lm" and lm[0]["position_mask"].tolist() == [True, True, False]


# --- fingerprints ------------------------------------------------------------------------


def test_fingerprint_is_a_fixed_function_of_the_content(tmp_path):
    # Golden values: a change here means every existing store's data check fails.
    tokens = load(write_parquet(tmp_path / "a.parquet", {"input_ids": IDS}), task="causal-lm")
    features = load(write_jsonl(tmp_path / "f.jsonl", [{"inputs": [0.5, -1.0]}, {"inputs": [2.0, 3.0]}]))
    assert tokens.fingerprint() == GOLDEN_TOKENS
    assert features.fingerprint() == GOLDEN_FEATURES


GOLDEN_TOKENS = "sha256:ae411538a5235947c8e859a4a5b9e856bab8149e8787badbd0cdc60e1bf64294"
GOLDEN_FEATURES = "sha256:edf65a49018ecd72795b0b6a05ec42480d60dae6c542bc669f502402fbf12559"


def test_fingerprint_ignores_hard_labels_but_not_inputs(tmp_path):
    base = load(write_parquet(tmp_path / "a.parquet", {"input_ids": IDS, "label": LABELS}))
    no_labels = load(write_parquet(tmp_path / "b.parquet", {"input_ids": IDS}), task="classification")
    other_labels = load(write_parquet(tmp_path / "c.parquet", {"input_ids": IDS, "label": [0, 0, 0]}))
    assert base.fingerprint() == no_labels.fingerprint() == other_labels.fingerprint()
    changed = [IDS[0], [8, 10], IDS[2]]
    reordered = [IDS[1], IDS[0], IDS[2]]
    recut = [[5, 6], [7, 8, 9], IDS[2]]  # same tokens, other sequence boundaries
    for i, ids in enumerate((changed, reordered, recut)):
        other = load(write_parquet(tmp_path / f"x{i}.parquet", {"input_ids": ids, "label": LABELS}))
        assert other.fingerprint() != base.fingerprint()
    assert load(tmp_path / "a.parquet", task="causal-lm").fingerprint() != base.fingerprint()


def test_fingerprint_covers_position_masks_and_seq_len(tmp_path):
    masked = load(write_parquet(tmp_path / "m.parquet", {"input_ids": IDS, "labels": IDS}))
    plain = load(write_parquet(tmp_path / "p.parquet", {"input_ids": IDS}), task="causal-lm")
    assert masked.fingerprint() != plain.fingerprint()
    text = write_text(tmp_path / "c.txt", "abcdefghij")
    five, four = (load(text, tokenizer="bytes", seq_len=n).fingerprint() for n in (5, 4))
    assert five != four


# --- errors ------------------------------------------------------------------------------


def test_unresolvable_specs(tmp_path):
    for spec in (tmp_path / "missing.parquet", "no-such-dataset"):
        with pytest.raises(ConfigError, match=r"not a file, directory, built-in \(mnist1d\) or package"):
            load(spec)
    with pytest.raises(ConfigError, match="cannot import"):
        load("no_such_module_xyz:load")


@pytest.mark.parametrize("columns, kw, message", [
    ({"text": ["a"], "label": [0]}, {}, "pass --tokenizer DIR \\(or bytes\\)"),
    ({"input_ids": [[1]]}, {}, "pass --task classification\\|causal-lm"),
    ({"input_ids": [[1]]}, {"ids_column": "toks"}, "no column 'toks'"),
    ({"input_ids": [[1]]}, {"label_column": "y"}, "no column 'y'"),
    ({"input_ids": [[1]], "label": ["cat"]}, {}, "not integer class ids"),
    ({"input_ids": [[1]], "label": [0.5]}, {}, "non-integer"),
    ({"input_ids": [[1, 300]], "label": [0]}, {"tokenizer": "bytes"}, "outside the vocabulary"),
    ({"input_ids": [[1], []], "label": [0, 1]}, {}, "row 1 has no tokens"),
    ({"inputs": [[1.0, 2.0], [3.0]]}, {}, "same number"),
    ({"inputs": [[1.0]]}, {"task": "causal-lm"}, "causal-lm needs token ids or text"),
    ({"input_ids": [[1.5]], "label": [0]}, {}, "list of numbers"),
    ({"input_ids": [[1, 2]], "labels": [[1]]}, {}, "must align with input_ids"),
    ({"words": ["a"]}, {}, "none of the columns"),
])
def test_table_errors(tmp_path, columns, kw, message):
    with pytest.raises(ConfigError, match=message) as error:
        load(write_parquet(tmp_path / "t.parquet", columns), **kw)
    assert "\n" not in str(error.value)  # the CLI prints it as one line


def test_path_errors(tmp_path, ids_parquet):
    with pytest.raises(ConfigError, match="which is the 'train' split"):
        load(ids_parquet, split="test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no .parquet"):
        load(tmp_path / "empty")
    text = write_text(tmp_path / "c.txt", "abcdef")
    with pytest.raises(ConfigError, match="causal-lm data"):
        load(text, tokenizer="bytes", task="classification")
    with pytest.raises(ConfigError, match="pass --tokenizer"):
        load(text)
    with pytest.raises(ConfigError, match="has no tokens"):
        load(write_text(tmp_path / "none.txt", ""), tokenizer="bytes")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(tmp_path / "latin1.txt", tokenizer="bytes")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"input_ids": [1]}\n{oops\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        load(bad_json)
    (tmp_path / "fake.parquet").write_bytes(b"not parquet")
    with pytest.raises(ConfigError, match="cannot read parquet"):
        load(tmp_path / "fake.parquet")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a directory or 'bytes'"):
        load_tokenizer("gpt2-not-downloaded")
    (tmp_path / "tok").mkdir()
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_tokenizer(str(tmp_path / "tok"))


def test_function_errors(tmp_path, monkeypatch):
    module = write_module(tmp_path, "user_bad", """
        def number(split):
            return 3

        def scalars(split):
            return [1, 2]

        def ragged_columns(split):
            return {"input_ids": [[1], [2]], "label": [0]}
    """, monkeypatch)
    for fn, message in (("number", "returned a int"), ("scalars", "items must be dicts"),
                        ("ragged_columns", "one value per row"), ("missing", "has no attribute")):
        with pytest.raises(ConfigError, match=message):
            load(f"{module}:{fn}")


def test_item_index_out_of_range(ids_parquet):
    data = load(ids_parquet)
    assert data[-1]["input_ids"].tolist() == IDS[-1]
    with pytest.raises(IndexError):
        data[3]
