"""`distill import-labels`: a store from top-k labels made elsewhere, which train-student then trains from."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distill.cli import cli
from distill.storage import open_store

from clihelp import metrics, run
from datahelp import MNIST1D_SMALL, make_hf_tokenizer, save_hf_dataset, write_parquet
from modelhelp import make_hf_causal_lm

K = 4
LENGTHS = (5, 9, 3, 12, 7)


def distill(*args):
    """``distill ARGS`` in this process (import-labels runs no model: no --device)."""
    return CliRunner().invoke(cli, [*map(str, args)])


def teacher_logprobs(teacher_dir, rows):
    """The teacher's full-vocabulary log-softmax (L, V) float64 at every token of each row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1) for ids in rows]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """A tiny teacher, its tokenizer, token rows, and the teacher's log-softmax on them."""
    root = tmp_path_factory.mktemp("import")
    tok, teacher = make_hf_tokenizer(root / "tok"), make_hf_causal_lm(root / "teacher", vocab=300)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 300, n).tolist() for n in LENGTHS]
    return {"root": root, "tok": tok, "teacher": teacher, "rows": rows, "logprobs": teacher_logprobs(teacher, rows)}


def topk_columns(logprobs, k=K, extra=0):
    """Per-row lists of per-position top-k ids and log-probabilities, largest first (``extra`` more at odd
    positions), as vLLM's prompt_logprobs or a top-k dataset hold them."""
    ids, lps = [], []
    for lp in logprobs:
        order = torch.argsort(lp, 1, descending=True)
        ids.append([order[t, : k + extra * (t % 2)].tolist() for t in range(len(lp))])
        lps.append([lp[t, order[t, : k + extra * (t % 2)]].tolist() for t in range(len(lp))])
    return ids, lps


def test_import_then_train_student_and_equal_to_what_generate_labels_writes(lm, tmp_path):
    ids, lps = topk_columns(lm["logprobs"])
    src = write_parquet(tmp_path / "src.parquet", {"input_ids": lm["rows"], "topk_ids": ids, "topk_logprobs": lps})
    common = ["--data", src, "--tokenizer", lm["tok"]]
    result = distill("import-labels", "--no-progress", *common, "--out", tmp_path / "store", "--value-encoding",
                     "lossless", "--teacher-name", "tiny-gpt2", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""  # --no-progress: silent
    assert json.loads(result.output)["positions"] == sum(LENGTHS)

    store = open_store(str(tmp_path / "store"))
    spec = store.spec
    assert (spec.method, spec.k, spec.vocab_size, spec.temperatures, spec.task) == ("topk", K, 300, (1.0,), "causal-lm")
    assert spec.extra["imported"]["teacher"] == "tiny-gpt2" and "temperature 1 only" in spec.extra["imported"]["note"]
    labels = store.read_all()
    reference = torch.cat(lm["logprobs"])  # (P, V) float64
    assert torch.equal(labels.topk_ids, torch.topk(reference, K, 1).indices.sort(1).values)
    torch.testing.assert_close(labels.topk_logprobs.double(), reference.gather(1, labels.topk_ids), rtol=0, atol=1e-6)
    naive_tail = torch.log1p(-reference.gather(1, labels.topk_ids).exp().sum(1))
    torch.testing.assert_close(labels.tail_logprob.double(), naive_tail, rtol=0, atol=1e-5)

    # stage one on the same data writes the same labels, tied to the same data
    run("generate-labels", "--teacher", lm["teacher"], *common, "--out", tmp_path / "generated", "--k", K,
        "--tail-samples", 0, "--temperature", 1, "--value-encoding", "lossless")
    generated = open_store(str(tmp_path / "generated"))
    assert generated.spec.dataset_fingerprint == spec.dataset_fingerprint
    assert torch.equal(generated.read_all().topk_ids, labels.topk_ids)
    torch.testing.assert_close(generated.read_all().tail_logprob, labels.tail_logprob, rtol=0, atol=1e-4)

    run("train-student", "--labels", tmp_path / "store", *common, "--student", lm["teacher"], "--out",
        tmp_path / "run", "--steps", 2, "--batch-size", 2)
    assert [m["step"] for m in metrics(tmp_path / "run") if "loss" in m][-1] == 2
    refused = run("train-student", "--labels", tmp_path / "store", *common, "--student", lm["teacher"], "--out",
                  tmp_path / "run2", "--steps", 2, "--temperature", 2, ok=False)
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "imported from top-k labels, does not hold (it holds 1): pass --temperature one of 1" in refused.stderr
    assert not (tmp_path / "run2").exists()


def test_a_datasets_source_with_its_own_column_names_and_ragged_k(lm, tmp_path):
    ids, lps = topk_columns(lm["logprobs"], k=K + 1, extra=2)  # K+1 ids, K+3 at odd positions
    reference = torch.cat(lm["logprobs"])  # (P, V) float64
    at = np.cumsum([0, *LENGTHS])
    lse = [torch.logsumexp(reference[a:b, :, None] / torch.tensor([3.0, 2.0]), 1).tolist() for a, b in zip(at, at[1:])]
    src = save_hf_dataset(tmp_path / "src", {"ids": ids, "lps": lps, "lse": lse})
    data = write_parquet(tmp_path / "data.parquet", {"input_ids": lm["rows"]})
    result = distill("import-labels", "--no-progress", "--data", data, "--source", src, "--tokenizer", lm["tok"],
                     "--topk-ids-column", "ids", "--topk-logprobs-column", "lps", "--k", K, "--backend", "parquet",
                     "--tempered-lse-column", "lse", "--temperature", 3, "--temperature", 2, "--value-encoding",
                     "lossless", "--out", tmp_path / "store")
    assert result.exit_code == 0, result.output
    store = open_store(str(tmp_path / "store"))
    assert (store.spec.backend, store.spec.k, store.spec.temperatures) == ("parquet", K, (1.0, 2.0, 3.0))
    labels = store.read_all()
    # each position's K most probable
    assert torch.equal(labels.topk_ids, torch.topk(reference, K, 1).indices.sort(1).values)
    # what the K kept leave of 1 is the tail (the source's extra ids join it), at T=1 and at the stored temperatures
    for t in (1.0, 2.0, 3.0):
        tempered = torch.log_softmax(reference / t, 1)
        logprobs, tail = labels.tempered(t)
        torch.testing.assert_close(logprobs.double(), tempered.gather(1, labels.topk_ids), rtol=0, atol=1e-5)
        naive_tail = torch.log1p(-tempered.gather(1, labels.topk_ids).exp().sum(1))
        torch.testing.assert_close(tail.double(), naive_tail, rtol=0, atol=1e-4)
    defaulted = distill("import-labels", "--no-progress", "--data", data, "--source", src, "--tokenizer", lm["tok"],
                        "--topk-ids-column", "ids", "--topk-logprobs-column", "lps", "--out", tmp_path / "store2")
    assert defaulted.exit_code == 0 and open_store(str(tmp_path / "store2")).spec.k == K + 1  # the fewest any has
    run("train-student", "--labels", tmp_path / "store", "--data", data, "--tokenizer", lm["tok"], "--student",
        lm["teacher"], "--out", tmp_path / "run", "--steps", 1, "--temperature", 2)  # a stored temperature
    one_too_few = distill("import-labels", "--data", data, "--source", src, "--tokenizer", lm["tok"], "--topk-ids-column",
                          "ids", "--topk-logprobs-column", "lps", "--tempered-lse-column", "lse", "--temperature", 2,
                          "--out", tmp_path / "store3")
    assert one_too_few.exit_code == 2 and "must hold, for every position, 1 finite normaliser(s)" in one_too_few.stderr
    again = distill("import-labels", "--no-progress", "--data", data, "--source", src, "--tokenizer", lm["tok"],
                    "--topk-ids-column", "ids", "--topk-logprobs-column", "lps", "--out", tmp_path / "store2", "--json")
    assert again.exit_code == 0 and json.loads(again.output)["shards_written"] == 0  # rerun: complete, nothing redone


def test_positions_the_source_lacks_are_masked_in_the_data(lm, tmp_path):
    # vLLM's prompt_logprobs hold no distribution after the last token: the data's position_mask leaves it out
    ids, lps = topk_columns([lp[:-1] for lp in lm["logprobs"]])
    mask = [[True] * (n - 1) + [False] for n in LENGTHS]
    src = write_parquet(tmp_path / "src.parquet", {"input_ids": lm["rows"], "position_mask": mask, "topk_ids": ids,
                                                   "topk_logprobs": lps})
    common = ["--data", src, "--tokenizer", lm["tok"]]
    assert distill("import-labels", "--no-progress", *common, "--out", tmp_path / "store").exit_code == 0
    labels = open_store(str(tmp_path / "store")).read_all()
    assert torch.equal(labels.token_index, torch.cat([torch.arange(n - 1, dtype=torch.int32) for n in LENGTHS]))
    reference = torch.cat([lp[:-1] for lp in lm["logprobs"]])
    assert torch.equal(labels.topk_ids, torch.topk(reference, K, 1).indices.sort(1).values)
    run("train-student", "--labels", tmp_path / "store", *common, "--student", lm["teacher"], "--out", tmp_path / "run",
        "--steps", 1)


def test_classification_rows_of_one_flat_list(tmp_path):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(160, 10))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.argsort(-lp, 1)[:, :3]
    src = write_parquet(tmp_path / "src.parquet", {"topk_ids": top.tolist(),
                                                    "topk_logprobs": np.take_along_axis(lp, top, 1).tolist()})
    result = distill("import-labels", "--no-progress", "--data", MNIST1D_SMALL, "--source", src, "--out",
                     tmp_path / "store")
    assert result.exit_code == 0, result.output
    labels = open_store(str(tmp_path / "store")).read_all()
    assert labels.num_examples == 160 and labels.k == 3
    tail = np.log1p(-np.exp(np.take_along_axis(lp, top, 1)).sum(1))
    np.testing.assert_allclose(labels.tail_logprob.numpy(), tail, atol=2e-3)
    run("train-student", "--labels", tmp_path / "store", "--data", MNIST1D_SMALL, "--student", "mlp", "--out",
        tmp_path / "run", "--steps", 2, "--temperature", 1)
    assert (tmp_path / "run" / "model").is_dir()


def _bad(lm, tmp_path, change):
    """Source columns with ``change(ids, lps, rows)`` applied in place."""
    ids, lps = topk_columns(lm["logprobs"])
    rows = [list(r) for r in lm["rows"]]
    change(ids, lps, rows)
    return write_parquet(tmp_path / "bad.parquet", {"input_ids": rows, "topk_ids": ids, "topk_logprobs": lps})


def _over_one(ids, lps, rows):
    lps[2][1] = [-0.1, -0.2, -0.3, -0.4]


def _row_short(ids, lps, rows):
    ids[1].pop()
    lps[1].pop()


def _out_of_vocabulary(ids, lps, rows):
    ids[3][0][0] = 300


@pytest.mark.parametrize("change, extra, message", [
    (_over_one, [], "row 2 of the source {src} has top-k probabilities that sum to 3.13"),
    (_row_short, [], "row 1 of the source has labels for 8 positions but example 1 of the data has 9 (one per token, "
                     "the last too)"),
    (_out_of_vocabulary, [], "row 3 of the source {src} has an id outside the vocabulary [0, 300)"),
    (lambda *a: None, ["--k", 5], "--k 5 is more than the 4 ids position 0 of row 0 has: pass --k 4 or less"),
    (lambda *a: None, ["--topk-ids-column", "nope"], "has no column 'nope'"),
    (lambda *a: None, ["--temperature", 2], "has no column 'tempered_lse' (columns: input_ids, topk_ids, topk_logprobs)"),
    (lambda *a: None, ["--source", "{other}"], "other.parquet' has 3 rows but data"),
])
def test_bad_sources_are_refused_in_one_line_before_anything_is_written(lm, tmp_path, change, extra, message):
    src = _bad(lm, tmp_path, change)
    other = write_parquet(tmp_path / "other.parquet", {"topk_ids": [[[1]]] * 3, "topk_logprobs": [[[-1.0]]] * 3})
    extra = [str(a).format(other=other) for a in extra]
    result = distill("import-labels", "--data", src, "--tokenizer", lm["tok"], "--out", tmp_path / "store", *extra)
    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert message.format(src=repr(str(src))) in result.stderr
    assert not (tmp_path / "store").exists()
