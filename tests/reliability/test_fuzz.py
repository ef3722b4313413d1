"""Fuzzing the manifest parser, the commit-record parser and the store reader with hypothesis.

Whatever the bytes, the store raises its own errors (StoreError and subclasses) and
nothing else, within a time limit and without growing memory without bound.
"""

import contextlib
import json
import resource
import shutil
import signal
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.errors import StoreError
from distill.storage import open_store
from distill.storage.fs import StoreFS
from distill.storage.manifest import Manifest, dumps_checked
from distill.storage.layout import commit_name, commit_path, read_commit_record

from storehelp import make_labels, write_store

FAST = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
LONG = settings(max_examples=1500, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MEMORY_MB = 512  # peak RSS may grow this much over a whole fuzz run, no more

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@contextlib.contextmanager
def bounded(seconds=10):
    """Fail on a hang (SIGALRM) or on peak memory growing past MEMORY_MB."""
    def hang(*_):
        raise AssertionError(f"took more than {seconds} s: a hang")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < MEMORY_MB, f"peak memory grew {grown_mb:.0f} MB"


def only_store_errors(fn):
    try:
        fn()
    except StoreError:
        pass


@pytest.fixture(scope="module", params=["zarr", "parquet"])
def pristine(request, tmp_path_factory):
    url = tmp_path_factory.mktemp(f"fuzz-{request.param}") / "s"
    write_store(url, make_labels("topk", n_examples=10), backend=request.param, encoding="sqrt", finalize=False)
    return url


def _manifest_doc(store):
    return json.loads((store / "manifest.json").read_text())


def _read_everything(url):
    reader = open_store(str(url))
    reader.verify()
    reader.summary()
    for index in reader.complete_shards():
        reader.read_shard(index)


# --- the manifest ------------------------------------------------------------------------


def _random_bytes_manifest(data):
    with bounded():
        only_store_errors(lambda: Manifest.from_bytes(data))


def _random_field_manifest(pristine, field_values):
    doc = _manifest_doc(pristine)
    for key, value in field_values.items():
        doc[key] = value
    try:
        data = dumps_checked(doc)
    except ValueError:  # e.g. an infinite float: not JSON at all
        return
    with bounded():
        only_store_errors(lambda: Manifest.from_bytes(data))


FIELDS = ["format", "format_version", "finalized", "method", "k", "vocab_size", "num_examples", "examples_per_shard",
          "temperatures", "value_encoding", "backend", "teacher_fingerprint", "sample_temperature", "has_token_index",
          "extra", "shards", "tool_version", "crc32", "nonsense"]
field_values = st.dictionaries(st.sampled_from(FIELDS), json_values, min_size=1, max_size=3)


@FAST
@given(st.binary(max_size=2000))
def test_random_bytes_as_a_manifest_give_only_store_errors(data):
    _random_bytes_manifest(data)


@FAST
@given(field_values)
def test_random_manifests_with_valid_checksums_give_only_store_errors(pristine, values):
    _random_field_manifest(pristine, values)


@pytest.mark.slow
@LONG
@given(st.binary(max_size=5000))
def test_random_bytes_as_a_manifest_long(data):
    _random_bytes_manifest(data)


@pytest.mark.slow
@LONG
@given(field_values)
def test_random_manifests_long(pristine, values):
    _random_field_manifest(pristine, values)


# --- commit records -------------------------------------------------------------------------

RECORD_FIELDS = ["index", "example_start", "example_stop", "positions", "files", "stats", "status", "crc32"]
record_values = st.dictionaries(st.sampled_from(RECORD_FIELDS), json_values, min_size=1, max_size=3)


def _random_record(pristine, tmp_path, values, raw):
    store = tmp_path / "s"
    if not store.exists():
        shutil.copytree(pristine, store)
    path = store / commit_path(0)
    doc = json.loads((pristine / commit_path(0)).read_text())
    doc.update(values)
    try:
        path.write_bytes(raw if raw is not None else dumps_checked(doc))
    except ValueError:
        return
    with bounded():
        only_store_errors(lambda: read_commit_record(StoreFS(str(store)), open_store(str(pristine)).spec, commit_name(0)))
        only_store_errors(lambda: _read_everything(store))


@FAST
@given(record_values, st.none() | st.binary(max_size=500))
def test_random_commit_records_give_only_store_errors(pristine, tmp_path, values, raw):
    _random_record(pristine, tmp_path, values, raw)


@pytest.mark.slow
@LONG
@given(record_values, st.none() | st.binary(max_size=2000))
def test_random_commit_records_long(pristine, tmp_path, values, raw):
    _random_record(pristine, tmp_path, values, raw)


# --- shard files, with their checksums recomputed so the decoders see the damage ------------

edits = st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                           st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6)


def _mutate(data: bytes, ops) -> bytes:
    b = bytearray(data)
    for op, where, value in ops:
        i = int(where * len(b)) if b else 0
        if op == "flip" and b:
            b[i] ^= 1 << (value % 8)
        elif op == "set" and b:
            b[i] = value
        elif op == "insert":
            b[i:i] = bytes([value]) * (1 + value % 7)
        elif op == "delete" and b:
            del b[i : i + 1 + value % 7]
        elif op == "truncate":
            del b[i:]
    return bytes(b)


def _random_shard_file(pristine, tmp_path, pick, ops):
    store = tmp_path / "s"
    if store.exists():
        shutil.rmtree(store)
    shutil.copytree(pristine, store)
    record_path = store / commit_path(0)
    record = json.loads(record_path.read_text())
    rel = sorted(record["files"])[int(pick * len(record["files"]))]
    path = store / "shards" / "000000" / rel
    data = _mutate(path.read_bytes(), ops)
    path.write_bytes(data)
    record["files"][rel] = {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    record_path.write_bytes(dumps_checked(record))
    with bounded():
        only_store_errors(lambda: _read_everything(store))


@settings(FAST, max_examples=15)
@given(st.floats(0, 1, exclude_max=True), edits)
def test_mutated_shard_files_with_valid_checksums_give_only_store_errors(pristine, tmp_path, pick, ops):
    _random_shard_file(pristine, tmp_path, pick, ops)


@pytest.mark.slow
@LONG
@given(st.floats(0, 1, exclude_max=True), edits)
def test_mutated_shard_files_long(pristine, tmp_path, pick, ops):
    _random_shard_file(pristine, tmp_path, pick, ops)
