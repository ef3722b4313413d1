"""Documents to sequences: windows, stride, packing, every data source, and packed attention."""

import random

import numpy as np
import pytest
import torch

from datahelp import make_hf_tokenizer, save_hf_dataset, write_jsonl, write_module, write_parquet, write_text
from modelhelp import make_hf_causal_lm
from distill.errors import ConfigError
from distill.pipeline.data import DataConfig, ExampleSet, load_data
from distill.pipeline.documents import documents_to_sequences
from distill.pipeline.models import CROSSES_DOCUMENTS, PER_DOCUMENT, ModelConfig, load_model, packed_attention

EOS = 999


# --- naive references --------------------------------------------------------------------


def naive_windows(docs, masks, seq_len, stride):
    """Each document: windows every seq_len - stride tokens until its end; later windows mask their first stride."""
    seqs, seq_masks = [], []
    for doc, mask in zip(docs, masks):
        start = 0
        while doc:
            seqs.append(doc[start:start + seq_len])
            m = list(mask[start:start + seq_len])
            seq_masks.append(m if start == 0 else [False] * stride + m[stride:])
            if start + seq_len >= len(doc):
                break
            start += seq_len - stride
    return seqs, seq_masks


def naive_pack(docs, masks, seq_len, has_masks):
    """Documents + EOS end to end, cut every seq_len; positions restart per document and window."""
    stream, keep, doc_start, is_eos = [], [], [], []
    for doc, mask in zip(docs, masks):
        start = len(stream)
        for tok, m in zip(doc, mask):
            stream.append(tok), keep.append(m), doc_start.append(start), is_eos.append(False)
        stream.append(EOS), keep.append(not has_masks), doc_start.append(start), is_eos.append(True)
    positions = []
    for i in range(len(stream)):
        window = i - i % seq_len
        positions.append(i - max(doc_start[i], window))
        if is_eos[i] and i + 1 < len(stream) and (i + 1) % seq_len:
            keep[i] = False  # the next document follows in this window
    cut = lambda xs: [xs[a:a + seq_len] for a in range(0, len(xs), seq_len)]
    return cut(stream), cut(keep), cut(positions)


def random_documents(rng, n, with_masks):
    docs = [[rng.randrange(500) for _ in range(rng.randrange(1, 40))] for _ in range(n)]
    masks = [[rng.random() < 0.7 if with_masks else True for _ in d] for d in docs]
    return docs, masks


def run(docs, masks, with_masks, seq_len, **kw):
    flat = np.array(sum(docs, []), np.int64)
    mask = np.array(sum(masks, []), bool) if with_masks else None
    out = documents_to_sequences(flat, np.array([len(d) for d in docs]), seq_len, position_mask=mask, **kw)
    bounds = np.cumsum(out.lengths)[:-1]
    split = lambda a: [x.tolist() for x in np.split(a, bounds)]
    full_mask = np.ones(len(out.input_ids), bool) if out.position_mask is None else out.position_mask
    ids = split(out.input_ids)
    position_ids = None if out.position_ids is None else split(out.position_ids)
    return out, ids, split(full_mask), position_ids


# --- windows, stride, packing against the references ---------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_windows_and_stride_match_the_naive_reference(seed):
    rng = random.Random(seed)
    with_masks = seed % 2 == 1
    docs, masks = random_documents(rng, 8, with_masks)
    for seq_len in (1, 3, 8, 64):
        for stride in sorted({0, seq_len // 2, seq_len - 1}):
            out, ids, kept, position_ids = run(docs, masks, with_masks, seq_len, stride=stride)
            want_ids, want_kept = naive_windows(docs, masks, seq_len, stride)
            assert ids == want_ids and kept == want_kept and position_ids is None
            # every position of every document is kept exactly once (as its mask says)
            assert out.stats["positions"] == sum(map(sum, masks))
            assert out.stats == {"documents": 8, "sequences": len(want_ids), "tokens": sum(map(len, docs)),
                                 "positions": sum(map(sum, masks)), "dropped_tokens": 0, "packed": False,
                                 "stride": stride}
            assert (out.position_mask is None) == (not with_masks and stride == 0 or
                                                   not with_masks and all(len(d) <= seq_len for d in docs))


@pytest.mark.parametrize("seed", range(6))
def test_packing_matches_the_naive_reference(seed):
    rng = random.Random(100 + seed)
    with_masks = seed % 2 == 1
    docs, masks = random_documents(rng, 6, with_masks)
    for seq_len in (1, 5, 16, 300):
        out, ids, kept, position_ids = run(docs, masks, with_masks, seq_len, pack=True, eos_id=EOS)
        want_ids, want_kept, want_positions = naive_pack(docs, masks, seq_len, with_masks)
        assert ids == want_ids and kept == want_kept and position_ids == want_positions
        assert all(p[0] == 0 for p in position_ids)
        assert out.stats["tokens"] == sum(map(len, docs)) and out.stats["dropped_tokens"] == 0
        assert out.stats["packed"] and out.stats["sequences"] == len(want_ids)


def test_limit_counts_the_dropped_tokens():
    ids, lengths = np.arange(30), np.array([10, 20])
    out = documents_to_sequences(ids, lengths, 8, limit=2)
    assert out.lengths.tolist() == [8, 2] and out.stats["dropped_tokens"] == 20
    out = documents_to_sequences(ids, lengths, 8, stride=4, limit=3)  # windows 0-7, 4-9 | 10-17
    assert out.lengths.tolist() == [8, 6, 8] and out.stats["dropped_tokens"] == 30 - 8 - 2 - 8
    out = documents_to_sequences(ids, lengths, 8, pack=True, eos_id=EOS, limit=2)  # 16 of 32 stream tokens
    assert out.stats["dropped_tokens"] == 30 - 15  # the first separator is no document token


def test_bad_arguments_are_refused():
    for kw in (dict(stride=8), dict(stride=-1), dict(pack=True), dict(pack=True, eos_id=1, stride=2)):
        with pytest.raises(ValueError):
            documents_to_sequences(np.arange(4), np.array([4]), 8, **kw)


# --- a 10,000-token document in every data source ------------------------------------------------

LONG = "".join(random.Random(0).choice("abcdefghij ") for _ in range(10_000))  # 10,000 bytes = tokens


def _source(kind, tmp_path, monkeypatch):
    if kind == "text file":
        return str(write_text(tmp_path / "long.txt", LONG))
    if kind == "jsonl":
        return str(write_jsonl(tmp_path / "long.jsonl", [{"text": LONG}, {"text": "short"}]))
    if kind == "parquet":
        return str(write_parquet(tmp_path / "long.parquet", {"text": [LONG, "short"]}))
    if kind == "datasets":
        return str(save_hf_dataset(tmp_path / "saved", {"text": [LONG, "short"]}))
    module = write_module(tmp_path, "longdata", f"""
        def load(split="train"):
            return [{{"text": {LONG!r}}}, {{"text": "short"}}]
        """, monkeypatch)
    return f"{module}:load"


@pytest.mark.parametrize("stride", [0, 24])
@pytest.mark.parametrize("kind", ["text file", "jsonl", "parquet", "datasets", "function"])
def test_a_long_document_keeps_every_position_in_every_source(kind, stride, tmp_path, monkeypatch):
    spec = _source(kind, tmp_path, monkeypatch)
    data = load_data(DataConfig(spec, task="causal-lm", tokenizer="bytes", seq_len=64, stride=stride))
    items = [data[i] for i in range(len(data))]
    kept = sum(int(it["position_mask"].sum()) if "position_mask" in it else len(it["input_ids"]) for it in items)
    extra = 0 if kind == "text file" else len("short")
    assert kept == 10_000 + extra  # every token of the document is a position, once
    assert max(len(it["input_ids"]) for it in items) == 64
    assert data.stats["positions"] == kept and data.stats["tokens"] == 10_000 + extra
    assert data.stats["dropped_tokens"] == 0 and data.stats["documents"] == (1 if kind == "text file" else 2)
    if stride == 0:  # the windows hold the document end to end
        assert bytes(sum((it["input_ids"].tolist() for it in items), [])) == (LONG + ("short" if extra else "")).encode()


def test_ids_column_rows_longer_than_seq_len_are_cut_and_shorter_ones_kept(tmp_path):
    rows = [list(range(1, 20)), [5, 6, 7]]
    labels = [[-100] * 3 + list(range(4, 20)), [5, 6, 7]]  # Hugging Face labels: a position mask
    data = load_data(DataConfig(str(write_parquet(tmp_path / "ids.parquet", {"input_ids": rows, "labels": labels})),
                                seq_len=8))
    assert [data[i]["input_ids"].tolist() for i in range(len(data))] == [
        list(range(1, 9)), list(range(9, 17)), [17, 18, 19], [5, 6, 7]]
    # position t is kept iff labels[t + 1] != -100; a row's last token has no target
    assert data[0]["position_mask"].tolist() == [False, False, True, True, True, True, True, True]
    assert data[2]["position_mask"].tolist() == [True, True, False]


def test_classification_text_counts_truncated_tokens(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", {"text": ["hi", "hello world"], "label": [1, 0]})
    data = load_data(DataConfig(str(path), tokenizer="bytes", seq_len=4))
    assert data.stats == {"documents": 2, "sequences": 2, "tokens": 13, "truncated_tokens": 7}


def test_limit_drops_tokens_and_says_so(tmp_path):
    data = load_data(DataConfig(str(write_text(tmp_path / "c.txt", "x" * 100)), tokenizer="bytes", seq_len=10,
                                limit=3))
    assert len(data) == 3 and data.stats["dropped_tokens"] == 70 and data.stats["sequences"] == 3


# --- packing through the data layer ----------------------------------------------------------------


@pytest.fixture(scope="module")
def eos_tokenizer(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("eos"), eos_token="[EOS]")


def test_packing_round_trip(tmp_path, eos_tokenizer):
    from transformers import AutoTokenizer

    texts = ["the cat sat on the mat", "a dog", "hello world, hello teacher", "the student learns"]
    reference = AutoTokenizer.from_pretrained(str(eos_tokenizer))
    eos = reference.eos_token_id
    data = load_data(DataConfig(str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])),
                                task="causal-lm", tokenizer=str(eos_tokenizer), seq_len=6, pack=True))
    items = [data[i] for i in range(len(data))]
    stream = sum((it["input_ids"].tolist() for it in items), [])
    documents, current = [], []
    for tok in stream:
        (documents.append(current), current := []) if tok == eos else current.append(tok)
    assert documents == [reference(t, add_special_tokens=False)["input_ids"] for t in texts] and not current
    assert data.packed and data.stats["packed"] and data.stats["documents"] == 4
    for it in items:
        ids, positions, mask = it["input_ids"].tolist(), it["position_ids"].tolist(), it["position_mask"].tolist()
        assert positions[0] == 0
        for t in range(1, len(ids)):  # positions step by 1 within a document, restart after a separator
            assert positions[t] == (0 if ids[t - 1] == eos else positions[t - 1] + 1)
            assert mask[t - 1] == (ids[t - 1] != eos)  # a separator followed in its window is masked out
    batch = data.collate([items[0], items[-1]])
    assert batch["position_ids"].shape == batch["input_ids"].shape
    n = len(items[-1]["input_ids"])
    if n < 6:  # padding continues the row's last position
        last = items[-1]["position_ids"][-1].item()
        assert batch["position_ids"][1, n:].tolist() == list(range(last + 1, last + 1 + 6 - n))
    packed_fp = data.fingerprint()
    unpacked = load_data(DataConfig(str(tmp_path / "d.jsonl"), task="causal-lm", tokenizer=str(eos_tokenizer),
                                    seq_len=6))
    assert not unpacked.packed and unpacked.fingerprint() != packed_fp
    assert data.head(2).packed and len(data.head(2)) == 2


def test_pack_and_stride_bad_inputs(tmp_path, eos_tokenizer):
    text = str(write_text(tmp_path / "c.txt", "abcdefgh"))
    with pytest.raises(ConfigError, match="tokenizer 'bytes' has none"):
        load_data(DataConfig(text, tokenizer="bytes", pack=True))
    with pytest.raises(ConfigError, match="--stride 8 must be an integer less than --seq-len 8"):
        DataConfig(text, tokenizer="bytes", seq_len=8, stride=8)
    with pytest.raises(ConfigError, match="drop --stride or --pack"):
        DataConfig(text, tokenizer="bytes", seq_len=8, stride=2, pack=True)
    ids = str(write_parquet(tmp_path / "i.parquet", {"input_ids": [[1, 2, 3]]}))
    with pytest.raises(ConfigError, match="pass --tokenizer DIR"):
        load_data(DataConfig(ids, task="causal-lm", pack=True))
    with pytest.raises(ConfigError, match="is classification data"):
        load_data(DataConfig("mnist1d:num_samples=200", stride=3))


# --- packed attention: a packed sequence's documents get the logits they get alone ------------------


def _packed_matches_alone(model):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 300, (5,), generator=g), torch.randint(1, 300, (7,), generator=g)
    data = ExampleSet("causal-lm", input_ids=torch.cat([a, b, b]), lengths=[12, 7],
                      position_ids=torch.cat([torch.arange(5), torch.arange(7), torch.arange(7)]))
    with torch.no_grad():
        packed = model.logits(data.collate([data[0], data[1]]))  # (2, 12, V): [A | B] and [B + padding]
        alone = [model.logits({"input_ids": x[None], "attention_mask": torch.ones(1, len(x), dtype=torch.long)})[0]
                 for x in (a, b)]
    torch.testing.assert_close(packed[0, :5], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 5:], alone[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :7], alone[1], atol=1e-5, rtol=1e-5)
    return packed, alone


def test_hf_packed_attention_is_per_document(tmp_path):
    model = load_model(ModelConfig(str(make_hf_causal_lm(tmp_path / "gpt2"))))
    assert packed_attention(model) == PER_DOCUMENT
    _packed_matches_alone(model)


def test_builtin_gpt_packed_attention_is_per_document():
    model = load_model(ModelConfig("gpt:vocab_size=300,d_model=32,n_heads=2,max_len=64"))
    assert packed_attention(model) == PER_DOCUMENT
    _packed_matches_alone(model)


def test_other_models_say_attention_crosses():
    model = load_model(ModelConfig("modelhelp:tiny_token_lm"))
    assert model.task == "causal-lm" and packed_attention(model) == CROSSES_DOCUMENTS
    data = ExampleSet("causal-lm", input_ids=torch.arange(1, 8), lengths=[7], position_ids=[0, 1, 2, 0, 1, 2, 3])
    assert model.logits(data.collate([data[0]])).shape[:2] == (1, 7)  # it reads the token ids alone


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_scripted_gpt_reads_position_ids_too():
    model = load_model(ModelConfig("gpt:vocab_size=300,d_model=32,n_heads=2,max_len=64"))
    scripted = torch.jit.script(model.module)  # what `distill quantize` exports
    ids, positions = torch.randint(300, (2, 9)), torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(scripted(ids, positions), model.module(ids, positions))
