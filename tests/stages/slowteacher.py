"""A deliberately slow classifier teacher for kill -9 tests (module:factory spec)."""

import time

import torch


class SlowMLP(torch.nn.Module):
    task = "classification"
    output_size = 10

    def __init__(self, delay: float):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
        self.delay = delay

    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)


def factory():
    return SlowMLP(delay=0.05)


def fast_factory():
    """The same weights without the delay: the uninterrupted reference run."""
    return SlowMLP(delay=0.0)


class SlowStudent(torch.nn.Module):
    """A small mnist1d classifier with dropout (so RNG state matters) that takes a while per step."""

    task = "classification"
    output_size = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(32, 10))

    def forward(self, x):
        time.sleep(0.01)
        return self.net(x)


def slow_student():
    return SlowStudent()
