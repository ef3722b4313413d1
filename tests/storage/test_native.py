"""The compiled top-k reduction (storage/reduce.c): float64 references, the torch path, ties, odd rows, the build."""

import os
import subprocess
import sys

import pytest
import torch
from distill.storage import compiled_topk_applies, native, topk_labels

# without a compiler, or with DISTILL_NATIVE=0, the torch path runs instead (tested in test_labels_and_codecs); a
# compiler that is there but fails is a failure here
pytestmark = pytest.mark.skipif(os.environ.get("DISTILL_NATIVE") == "0" or native.default_compiler() is None,
                                reason="no C compiler, or DISTILL_NATIVE=0: only the torch path runs")


def _logits(p, v, seed, scale=3.0):
    return torch.randn(p, v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _both(monkeypatch, logits, k, temperatures=(), seed=None, **kw):
    """topk_labels by the compiled path, then by the torch path, on copies of ``logits`` (generators of ``seed``)."""
    a = topk_labels(logits.clone(), k, temperatures, generator=_generator(seed), **kw)
    monkeypatch.setenv("DISTILL_NATIVE", "0")
    b = topk_labels(logits.clone(), k, temperatures, generator=_generator(seed), **kw)
    monkeypatch.delenv("DISTILL_NATIVE")
    return a, b


def _generator(seed):
    return None if seed is None else torch.Generator().manual_seed(seed)


def test_the_library_builds_on_a_machine_with_a_compiler():
    assert native.library() is not None


@pytest.mark.parametrize("v", [4096, 5003])  # whole blocks; a short last block
@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("scale", [0.1, 3.0, 40.0])
def test_compiled_labels_match_dense_float64(v, k, scale):
    logits = _logits(60, v, seed=v + k, scale=scale).float()  # the reference takes the same float32 logits
    assert native.topk_reduce(logits, k, [0.5, 1 / 3]) is not None
    labels = topk_labels(logits, k, temperatures=(2.0, 3.0, 1.0))
    dense = torch.log_softmax(logits.double(), 1)
    ref_ids = dense.topk(k, 1).indices
    assert torch.equal(labels.topk_ids, ref_ids.sort(1).values)
    assert torch.allclose(labels.topk_logprobs.double(), dense.gather(1, labels.topk_ids), atol=1e-5, rtol=0)
    ref_tail = dense.scatter(1, ref_ids, float("-inf")).logsumexp(1)
    assert (labels.tail_logprob.double() - ref_tail).abs().max() < 1e-4  # under 0.01% of the tail, however small
    assert labels.temperatures == (2.0, 3.0)
    for j, t in enumerate((2.0, 3.0)):
        assert torch.allclose(labels.tempered_lse[:, j].double(), (dense / t).logsumexp(1), atol=1e-5, rtol=0)


def test_block_sums_and_tempered_sums_match_float64():
    logits = _logits(40, 5003, seed=2).float()
    top, ids, sums, tail, tempered, _ = native.topk_reduce(logits, 8, [0.5, 0.25, 1.0])
    x = logits.double()
    e = (x - x.amax(1, keepdim=True)).exp()  # (P, V)
    assert torch.equal(top, x.gather(1, ids).float()) and torch.equal(top.amax(1), logits.amax(1))
    outside = e.scatter(1, ids, 0.0)
    ref_sums = torch.nn.functional.pad(outside, (0, 32 - 5003 % 32)).view(40, -1, 32).sum(2)  # (P, blocks)
    assert torch.allclose(sums.double(), ref_sums, rtol=2e-6, atol=0)
    assert torch.allclose(tail, outside.sum(1), rtol=2e-6, atol=0)
    for j, a in enumerate((0.5, 0.25, 1.0)):
        assert torch.allclose(tempered[:, j], (e**a).sum(1), rtol=2e-6, atol=0)


def test_the_compiled_and_torch_paths_give_the_same_labels_and_draws(monkeypatch):
    logits = _logits(64, 32000, seed=7)
    a, b = _both(monkeypatch, logits, 64, (2.0,), seed=3, tail_samples=48)
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-6, rtol=0)
    assert torch.allclose(a.tail_logprob, b.tail_logprob, atol=1e-6, rtol=0)
    assert torch.allclose(a.tempered_lse, b.tempered_lse, atol=1e-6, rtol=0)
    # the same offsets of the generator, the same points: a draw differs only where a point sits within float32
    # rounding of an id's edge (none here)
    assert torch.equal(a.tail_ids, b.tail_ids) and torch.equal(a.tail_counts, b.tail_counts)


@pytest.mark.parametrize("v", [8192, 8203])
def test_compiled_tail_draws_equal_one_float64_cumulative_sum_of_the_tail(v):
    """Each draw is the id whose float64 cumulative tail mass passes its point (u + i) / m, but for a point within
    2e-7 of the tail's mass of an edge between two ids, where the float32 terms may put it on either side."""
    logits = _logits(40, v, seed=v, scale=4.0)
    labels = topk_labels(logits, 16, tail_samples=48, generator=torch.Generator().manual_seed(1))
    offset = torch.rand(40, 1, generator=torch.Generator().manual_seed(1))  # the offsets the draws take
    cdf = torch.softmax(logits, 1).scatter(1, labels.topk_ids, 0.0).cumsum(1)  # (P, V) the tail's, float64
    total = cdf[:, -1:]
    points = (offset.double() + torch.arange(48, dtype=torch.float64)) / 48 * total
    ref = torch.searchsorted(cdf, points, right=True).clamp_max(v - 1)  # (P, m)
    lower = torch.where(ref > 0, cdf.gather(1, (ref - 1).clamp_min(0)), 0.0)
    near = torch.minimum(points - lower, cdf.gather(1, ref) - points) < 2e-7 * total
    assert int(near.sum()) <= 8  # of 1,920 points: the check below covers nearly all
    for row in range(40):
        want = torch.bincount(ref[row][~near[row]], minlength=v)
        got = torch.zeros(v, dtype=torch.int64).index_add_(0, labels.tail_ids[row], labels.tail_counts[row].long())
        assert bool((got >= want).all()) and int((got - want).sum()) == int(near[row].sum())


@pytest.mark.parametrize("kind", ["normal", "integers", "one_hot_block", "spread", "tied_top_blocks"])
@pytest.mark.parametrize("k", [1, 3, 64])
def test_every_route_of_the_top_k_search_finds_the_k_largest(kind, k):
    """The search's routes: few candidate blocks (k = 1, 3), many narrowed by binning their maxima (normal, k = 64),
    tied maxima that binning cannot separate (integers: the general search), one block far above the rest, a row
    whose values rise steadily (every group maximum in its last block), and 320 values tied at the top over 11
    blocks (at k = 1 and 3 all of them candidates, more values than 4k blocks hold)."""
    g = torch.Generator().manual_seed(k)
    x = {"normal": lambda: torch.randn(30, 8203, generator=g) * 3,
         "integers": lambda: torch.randint(-3, 4, (30, 8203), generator=g).float(),
         "one_hot_block": lambda: torch.randn(30, 8203, generator=g).index_fill_(1, torch.arange(64, 128), 50.0),
         "spread": lambda: torch.linspace(-20, 20, 8203).repeat(30, 1) + torch.rand(30, 8203, generator=g) * 1e-3,
         "tied_top_blocks": lambda: torch.randn(30, 8203, generator=g).index_fill_(1, torch.arange(40, 360), 10.0),
         }[kind]()
    top, ids, sums, tail, _, _ = native.topk_reduce(x, k)
    assert torch.equal(x.gather(1, ids), top) and all(len(set(r.tolist())) == k for r in ids)
    assert torch.equal(top.sort(1, descending=True).values, x.topk(k, 1).values)
    e = (x.double() - x.double().amax(1, keepdim=True)).exp()
    assert torch.allclose(tail, e.scatter(1, ids, 0.0).sum(1), rtol=2e-6, atol=0)


def test_a_row_with_plus_inf_is_left_to_the_torch_path():
    x = _logits(8, 8192, seed=3).float()
    x[5, 4000] = float("inf")
    assert native.topk_reduce(x, 16) is None and native.topk_reduce(x[:5], 16) is not None


def test_ties_at_the_kth_value_keep_k_ids_and_leave_the_others_in_the_tail():
    """bf16 teachers give many equal logits: the kept ids hold the k largest values, tied ids outside them
    stay in the tail (its mass and its draws), and no draw lands on a kept id."""
    logits = (_logits(50, 4096, seed=5) * 0.3).bfloat16().float()  # few distinct values near the top
    labels = topk_labels(logits, 16, temperatures=(2.0,), tail_samples=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits.gather(1, labels.topk_ids).sort(1).values, logits.topk(16, 1).values.sort(1).values)
    assert all(len(set(row.tolist())) == 16 for row in labels.topk_ids)
    dense = torch.log_softmax(logits.double(), 1)
    ref_tail = dense.scatter(1, labels.topk_ids, float("-inf")).logsumexp(1)
    assert (labels.tail_logprob.double() - ref_tail).abs().max() < 1e-4
    assert torch.allclose(labels.topk_logprobs.double(), dense.gather(1, labels.topk_ids), atol=1e-5, rtol=0)
    kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels.topk_ids, True)
    drawn = labels.tail_counts > 0
    assert not bool(kept.gather(1, labels.tail_ids)[drawn].any())
    assert bool((labels.tail_counts.sum(1) == 32).all())


def test_masked_vocabulary_rows_and_rows_of_a_wider_tensor(monkeypatch):
    wide = _logits(30, 6000, seed=9).float()
    logits = wide[:, :5000]  # rows 6,000 apart: the compiled code reads them in place
    logits[0, 100:] = float("-inf")  # a masked vocabulary: 100 live ids
    logits[1, :4990] = float("-inf")  # 10 live ids, fewer than k: the torch path takes these logits
    a, b = _both(monkeypatch, logits, 16, (2.0,))
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert torch.allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-6, rtol=0)
    assert native.topk_reduce(logits[2:], 16) is not None and native.topk_reduce(logits, 16) is None
    rest = topk_labels(logits[2:], 16, (2.0,))
    assert torch.allclose(rest.tail_logprob, b.tail_logprob[2:], atol=1e-6, rtol=0)
    assert bool(torch.isneginf(a.tail_logprob[1]))  # nothing is left outside the 10 live ids and 6 at -inf


def test_a_nan_falls_back_to_the_torch_path_with_the_same_draws(monkeypatch):
    logits = _logits(20, 8192, seed=4).float()
    logits[3, 17] = float("nan")
    assert native.topk_reduce(logits, 8) is None
    kw = dict(tail_samples=16)
    a = topk_labels(logits.clone(), 8, (), generator=torch.Generator().manual_seed(2), **kw)
    monkeypatch.setenv("DISTILL_NATIVE", "0")
    b = topk_labels(logits.clone(), 8, (), generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a.tail_ids, b.tail_ids) and torch.equal(a.tail_counts, b.tail_counts)
    assert torch.equal(a.topk_ids, b.topk_ids)


def test_the_result_does_not_depend_on_the_number_of_threads():
    logits = _logits(100, 4096, seed=6).float()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.topk_reduce(logits, 8, [0.5], torch.rand(100), 16)
        torch.set_num_threads(2)
        two = native.topk_reduce(logits, 8, [0.5], torch.rand(100), 16)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(one[:5], two[:5]):
        assert torch.equal(x, y)


def test_a_build_is_cached_and_a_missing_compiler_is_reported_not_raised(tmp_path, capfd):
    assert native.build(cache=tmp_path / "a") is not None
    built = list((tmp_path / "a").glob("reduce-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert native.build(cache=tmp_path / "a") is not None and built[0].stat().st_mtime_ns == stamp  # not rebuilt
    assert native.build(compiler=str(tmp_path / "no-such-cc"), cache=tmp_path / "b") is None
    assert "compiled code (reduce.c) is not available" in capfd.readouterr().err
    assert list((tmp_path / "b").iterdir()) == []  # nothing half-built left behind


def test_distill_native_0_turns_it_off_in_a_fresh_process(tmp_path):
    code = "from distill.storage import native; print(native.library() is None)"
    env = {**os.environ, "DISTILL_NATIVE": "0", "DISTILL_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True" and not any(tmp_path.iterdir())


def test_processes_building_at_once_into_one_cache_each_get_a_whole_library(tmp_path):
    """torchrun's ranks all build on first use: each compiles to its own temporary file and renames it into place."""
    code = ("import sys; from pathlib import Path; from distill.storage import native; "
            "sys.exit(native.build(cache=Path(sys.argv[1])) is None)")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)]) for _ in range(3)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    assert len(list(tmp_path.glob("reduce-*.so"))) == 1 and not list(tmp_path.glob("*.so.*")) and \
        len(list(tmp_path.iterdir())) == 1


def test_which_settings_take_the_compiled_reduction(monkeypatch):
    assert compiled_topk_applies(32000, 64, 48) and compiled_topk_applies(32000, 4)
    assert not compiled_topk_applies(1024, 16)  # 32 blocks: fewer than 4 k
    assert not compiled_topk_applies(4096, 8, 48)  # 48 draws need 4 x 48 blocks
    assert not compiled_topk_applies(32000, 4, 48, sample_temperature=2.0)
    assert not compiled_topk_applies(32000, 4, 48, sampling="iid")
    monkeypatch.setenv("DISTILL_NATIVE", "0")
    assert not compiled_topk_applies(32000, 64, 48)
