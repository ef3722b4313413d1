"""The allocator's thresholds: set on glibc unless the user chose an allocator or its settings."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

import distill.pipeline.allocator as allocator
from distill.pipeline.allocator import tune_allocator


@pytest.mark.parametrize("env", [
    {"DISTILL_MALLOC": "system"}, {"MALLOC_ARENA_MAX": "2"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"}])
def test_the_users_choice_is_left_alone(env, monkeypatch):
    monkeypatch.setattr(allocator, "c_library", lambda: pytest.fail("mallopt called despite the user's choice"))
    assert tune_allocator(env) == "user"


def test_off_glibc_nothing_is_done(monkeypatch):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(allocator, "c_library", lambda: pytest.fail("mallopt called off glibc"))
    assert tune_allocator({}) == "unavailable"


def test_on_glibc_both_thresholds_are_set_to_their_ceilings(monkeypatch):
    calls, answer = [], [1]

    class Libc:  # mallopt as glibc answers it: 1 when it takes the value, 0 when it refuses
        def mallopt(self, param, value):
            calls.append((param, value))
            return answer[0]

    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(allocator, "c_library", Libc)
    assert tune_allocator({}) == "tuned"
    assert calls == [(-3, 32 << 20), (-1, 64 << 20)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD (malloc.h)
    calls.clear()
    assert tune_allocator({}, mmap_threshold=1 << 30, trim_threshold=1 << 31) == "tuned"  # a caller's own values
    assert calls == [(-3, 1 << 30), (-1, 1 << 31)]
    answer[0] = 0
    assert tune_allocator({}) == "unavailable"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_the_real_mallopt_accepts_the_values():
    libc = allocator.c_library()  # the process's own C library, found without a subprocess
    assert libc.mallopt(-3, allocator.MMAP_THRESHOLD) == 1 and libc.mallopt(-1, allocator.TRIM_THRESHOLD) == 1


def test_releasing_free_memory_leaves_the_users_choice_alone_and_does_nothing_off_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "c_library", lambda: pytest.fail("malloc_trim called despite the user's choice"))
    assert allocator.release_free_memory({"DISTILL_MALLOC": "system"}) == "user"
    assert allocator.release_free_memory({"LD_PRELOAD": "libjemalloc.so.2"}) == "user"
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.release_free_memory({}) == "unavailable"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.system() != "Linux", reason="glibc on Linux only")
def test_releasing_free_memory_gives_freed_heap_blocks_back_to_the_os():
    # in a fresh process: 256 blocks of 1 MiB, kept in the heap by high thresholds and written to, then all freed
    # but the last (so the heap's top stays live and the trim threshold alone could not return them)
    script = textwrap.dedent("""
        import ctypes, json
        from distill.pipeline.allocator import release_free_memory
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        libc.mallopt(-3, 1 << 30); libc.mallopt(-1, 1 << 31)
        def rss_mb():
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * 4096 / 2**20
        blocks = [libc.malloc(1 << 20) for _ in range(256)]
        for b in blocks:
            ctypes.memset(b, 1, 1 << 20)
        for b in blocks[:-1]:
            libc.free(b)
        before = rss_mb()
        done = release_free_memory({})
        print(json.dumps({"before": before, "after": rss_mb(), "done": done}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["done"] == "released"
    assert figures["before"] - figures["after"] > 200, figures  # of the 255 MiB freed
