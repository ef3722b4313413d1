"""The allocator's thresholds: set on glibc unless the user chose an allocator or its settings."""

import platform

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
