"""Interleaved timing: rounds, warm-up, the fastest call; checked on a fake clock."""

import pytest

import distill.pipeline.timing as timing
from distill.pipeline.timing import speedup_text, time_together


class Clock:
    """perf_counter's stand-in: each pass advances it by its own duration."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def __call__(self):
        return self.now

    def pass_taking(self, name, seconds):
        def run():
            self.calls.append(name)
            self.now += seconds(len([c for c in self.calls if c == name])) if callable(seconds) else seconds
        return run


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(timing.time, "perf_counter", fake)
    return fake


def test_passes_are_timed_in_rotating_rounds(clock):
    a, b = clock.pass_taking("a", 0.002), clock.pass_taking("b", 0.010)
    assert time_together([a, b], warmup=2, repeats=3) == [pytest.approx(0.002), pytest.approx(0.010)]
    assert clock.calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b"]  # warm-up, then each round starts later


def test_the_figure_is_the_fastest_call_so_a_disturbed_one_does_not_count(clock):
    disturbed = lambda n: {2: 0.5, 3: 0.004}.get(n, 0.001)  # noqa: E731  another process takes the CPU twice
    a = clock.pass_taking("a", disturbed)
    assert time_together([a], warmup=1, repeats=4) == [pytest.approx(0.001)]
    assert clock.calls == ["a"] * 5
    assert time_together([clock.pass_taking("c", 0.003)], warmup=0, repeats=1) == [pytest.approx(0.003)]


def test_speedup_text():
    assert speedup_text(3.21) == "3.2× faster" and speedup_text(0.5) == "2.0× slower"
    assert speedup_text(None) == "of unknown speed"


def test_rounds_go_on_until_they_have_taken_min_seconds(clock):
    a, b = clock.pass_taking("a", 0.1), clock.pass_taking("b", 0.15)
    assert time_together([a, b], warmup=0, repeats=2, min_seconds=1.0) == [pytest.approx(0.1), pytest.approx(0.15)]
    assert clock.calls.count("a") == 4  # 2 rounds take 0.5 s; 4 take 1 s


def test_a_burst_calls_a_pass_until_it_has_taken_burst_seconds_and_each_call_counts(clock):
    slow_first = lambda n: 0.004 if n % 3 == 1 else 0.001  # noqa: E731  each burst's first call is cold
    a, b = clock.pass_taking("a", slow_first), clock.pass_taking("b", 0.010)
    assert time_together([a, b], warmup=0, repeats=2, burst_seconds=0.006) == [pytest.approx(0.001),
                                                                                   pytest.approx(0.010)]
    # a: 4 + 1 + 1 ms reach 6 ms in three calls; b's one call already takes longer than the burst
    assert clock.calls == ["a", "a", "a", "b", "b", "a", "a", "a"]
