"""Flipped bytes, truncated and missing files, damaged manifests: detected, named, and redone."""

import json
import random
import shutil
from pathlib import Path

import pytest

from distill.errors import CorruptStoreError, IncompatibleStoreError, StoreError
from distill.storage import open_store
from distill.storage.manifest import dumps_checked

from killhelp import GENERATE, assert_same_store, commit_records, one_line_error, run


@pytest.fixture(scope="module", params=["zarr", "parquet"])
def pristine(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"pristine-{request.param}") / "store"
    run(*GENERATE, "--backend", request.param, "--out", out)
    return out


@pytest.fixture
def store(pristine, tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(pristine, copy)
    return copy


def kinds(store: Path) -> dict[str, list[Path]]:
    """Every kind of file of a store, by kind."""
    files = sorted(p for p in store.rglob("*") if p.is_file())
    return {
        "manifest": [p for p in files if p.name == "manifest.json"],
        "commit record": [p for p in files if p.name.endswith(".commit.json")],
        "metadata": [p for p in files if p.name == "zarr.json"],
        "chunk or table": [p for p in files if p.parent.name == "c" or p.parent.parent.name == "c" or p.suffix == ".parquet"],
    }


def changes_data(path: Path, before: bytes, after: bytes) -> bool:
    """A flip in a JSON file changes data unless both parse to the same value (`1e-05` vs `1E-05`)."""
    if not path.name.endswith(".json") or path.name == "zarr.json":
        return before != after
    try:
        return json.loads(before) != json.loads(after)
    except ValueError:
        return True


def found(store: Path) -> set:
    """What the store's own checks report damaged: shard indexes, or "manifest"."""
    try:
        reader = open_store(str(store))
    except CorruptStoreError as e:
        if e.shard is None:
            assert "manifest.json" in str(e)
            return {"manifest"}
        assert f"shard {e.shard}" in str(e)
        return {e.shard}
    return {d["shard"] for d in reader.verify()}


def owner(store: Path, path: Path):
    """The shard a file belongs to, or "manifest"."""
    if path.name == "manifest.json":
        return "manifest"
    rel = path.relative_to(store / "shards")
    return int(rel.parts[0].split(".")[0])


def flip(path: Path, rng: random.Random) -> tuple[bytes, bytes]:
    before = path.read_bytes()
    damaged = bytearray(before)
    damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(damaged))
    return before, bytes(damaged)


def sweep(store: Path, flips_per_kind: int, seed: int) -> dict:
    rng = random.Random(seed)
    counts = {"flips": 0, "changed_data": 0, "detected": 0}
    present = {kind: files for kind, files in kinds(store).items() if files}  # parquet has no separate metadata
    assert len(present) >= 3
    for kind, files in present.items():
        for _ in range(flips_per_kind):
            path = rng.choice(files)
            before, after = flip(path, rng)
            counts["flips"] += 1
            if changes_data(path, before, after):
                counts["changed_data"] += 1
                assert found(store) == {owner(store, path)}, f"flip in {path.relative_to(store)} not named"
                counts["detected"] += 1
            path.write_bytes(before)
    assert found(store) == set()
    return counts


def test_flipped_bytes_in_every_kind_of_file_are_caught_and_named(store):
    counts = sweep(store, flips_per_kind=3, seed=0)
    assert counts["detected"] == counts["changed_data"] >= 8


@pytest.mark.slow
def test_many_flipped_bytes_are_all_caught(store):
    counts = sweep(store, flips_per_kind=34, seed=1)  # 34 per kind of file: 136 in a zarr store, 102 in a Parquet one
    print(f"\nflips {counts}")
    assert counts["flips"] >= 100 and counts["detected"] == counts["changed_data"]


@pytest.mark.parametrize("where", ["chunk or table", "commit record"])
def test_inspect_verify_names_the_damaged_shard_and_repair_redoes_just_it(store, pristine, where):
    path = sorted(p for p in kinds(store)[where] if owner(store, p) == 5)[-1]
    flip(path, random.Random(3))
    result = run("inspect", store, "--verify", ok=False)
    assert result.exit_code == 1 and "1 damaged shard(s)" in result.stdout and "shard 5:" in result.stdout, result.output
    if where == "commit record":  # the store still reads: the manifest holds the sealed copy of the record
        assert open_store(str(store)).read_shard(5).num_examples == 40
    before = commit_records(store)
    loud = [a for a in GENERATE if a != "--no-progress"]  # --no-progress silences the status lines read here
    result = run(*loud, "--backend", open_store(str(pristine)).spec.backend, "--out", store, "--repair")
    assert "--repair: 1 damaged shard(s) to redo (5)" in result.stderr and "1 to do" in result.stderr
    after = commit_records(store)
    assert {k: v for k, v in after.items() if k != "000005.commit.json"} == {
        k: v for k, v in before.items() if k != "000005.commit.json"}, "only the damaged shard is redone"
    assert run("inspect", store, "--verify").exit_code == 0
    assert_same_store(pristine, store)
    assert not list((store / "shards").glob("*.lock")), "checking a shard leaves no lock file behind"


def _unsealed(store):
    """The store as it is while being written: manifest without the shard table, so records are read."""
    manifest = json.loads((store / "manifest.json").read_text())
    manifest.update(finalized=False, shards=[{k: s[k] for k in ("index", "example_start", "example_stop")} | {"status": "pending"}
                                             for s in manifest["shards"]])
    (store / "manifest.json").write_bytes(dumps_checked(manifest))


def _newer(store):
    doc = json.loads((store / "manifest.json").read_text())
    doc["format_version"] = 2
    (store / "manifest.json").write_bytes(dumps_checked(doc))


DAMAGE = {
    "truncated shard file": (lambda s: (p := kinds(s)["chunk or table"][-1]).write_bytes(p.read_bytes()[:-5]),
                             CorruptStoreError, "fails its checksum"),
    "missing shard": (lambda s: shutil.rmtree(s / "shards" / "000002"), CorruptStoreError, "shard 2 is missing its file"),
    "deleted manifest": (lambda s: (s / "manifest.json").unlink(), StoreError, "no manifest.json"),
    "malformed manifest": (lambda s: (s / "manifest.json").write_text('{"format": "distill-soft-labels", '),
                           CorruptStoreError, "manifest.json is not valid JSON"),
    "edited manifest": (lambda s: (s / "manifest.json").write_text((s / "manifest.json").read_text().replace('"k": 3', '"k": 4')),
                        CorruptStoreError, "manifest.json fails its checksum"),
    "newer format": (_newer, IncompatibleStoreError, "newer than this distill reads (1): upgrade distill"),
    "damaged record while being written": (
        lambda s: (_unsealed(s), (p := s / "shards" / "000004.commit.json").write_text(p.read_text().replace("40", "41", 1))),
        CorruptStoreError, "commit record of shard 4 fails its checksum"),
}


def backend_of(store) -> str:
    return "parquet" if list(store.rglob("*.parquet")) else "zarr"


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_stores_are_clear_errors(store, damage):
    spoil, error, message = DAMAGE[damage]
    spoil(store)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        reader = open_store(str(store))
        reader.read_all()
    verify = run("inspect", store, "--verify", ok=False)
    if verify.exit_code == 1:  # the store opens: the damaged shard is listed
        assert "damaged shard(s)" in verify.stdout
    else:
        one_line_error(verify, message)
    if backend_of(store) == "parquet":
        return  # train-student meets the damage through the same reader whatever the backend: once is enough
    workers = 1 if damage == "truncated shard file" else 0  # 1: a DataLoader worker process meets the damage
    train = run("train-student", "--labels", store, "--student", "faultdata:student", "--data", "faultdata:features",
                "--steps", 2, "--workers", workers, "--out", store.parent / "run", "--no-progress", ok=False)
    one_line_error(train, "shard" if error is CorruptStoreError and "manifest" not in message else message, alone=False)
    assert not (store.parent / "run" / "model").exists()
