"""kill -9 of `distill generate-labels` at deterministic points: the rerun resumes to the same store."""

import pytest

from distill.storage import open_store

from killhelp import GENERATE, assert_same_store, commit_records, killed, run

# (point, what the moment is); 12 shards x 4 batches; zarr writes 8 files per shard
DEFAULT_POINTS = ["forward:7:during", "shard-file:13:during"]  # commit records and the manifest: the sweep
SWEEP = [
    *(f"forward:{n}:{phase}" for n in (1, 4, 5, 19, 33, 48) for phase in ("during", "after")),
    *(f"shard-file:{n}:{phase}" for n in (1, 8, 9, 30, 96) for phase in ("during", "after")),
    *(f"commit:{n}:{phase}" for n in (1, 5, 12) for phase in ("during", "after")),
    *(f"manifest:{n}:{phase}" for n in (1, 2) for phase in ("during", "after")),
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's store."""
    out = tmp_path_factory.mktemp("reference") / "store"
    run(*GENERATE, "--out", out)
    return out


def _kill_then_rerun(point, reference, out, env, backend="zarr"):
    args = [*GENERATE, "--backend", backend, "--out", out]
    killed(point, args, env)
    before = commit_records(out) if (out / "shards").exists() else {}
    if (out / "manifest.json").exists() and point != "manifest:2:after":
        assert not open_store(str(out)).manifest.finalized, "killed before sealing: the store must not look sealed"
    run(*args)
    after = commit_records(out)
    assert {name: after[name] for name in before} == before, "complete shards must not be redone"
    reader = open_store(str(out))
    assert reader.complete and reader.manifest.finalized and reader.verify() == []
    assert_same_store(reference, out)


@pytest.mark.parametrize("point", DEFAULT_POINTS)
def test_kill_9_at_a_point_then_rerun_gives_the_uninterrupted_store(point, reference, tmp_path, helper_env):
    _kill_then_rerun(point, reference, tmp_path / "store", helper_env)


@pytest.mark.slow
@pytest.mark.parametrize("point", SWEEP)
def test_kill_9_sweep_then_rerun_gives_the_uninterrupted_store(point, reference, tmp_path, helper_env):
    _kill_then_rerun(point, reference, tmp_path / "store", helper_env)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["shard-file:2:during", "shard-file:3:after", "commit:4:during", "forward:10:during"])
def test_kill_9_sweep_parquet(point, reference, tmp_path, helper_env):
    _kill_then_rerun(point, reference, tmp_path / "store", helper_env, backend="parquet")
