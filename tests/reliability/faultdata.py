"""Cheap seeded data for the reliability tests (a package.module:function data spec).

480 examples of 40 float features and a class label in 0..9: the shape of mnist1d (so
slowteacher's models take it) without the seconds mnist1d takes to generate in every
subprocess.
"""

import torch


def features(split: str = "train") -> dict:
    g = torch.Generator().manual_seed(0 if split == "train" else 1)
    n = 480 if split == "train" else 120
    inputs = torch.randn(n, 40, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    return {"inputs": inputs.tolist(), "label": labels.tolist()}


class Student(torch.nn.Module):
    """A small classifier with dropout, so a resumed run must restore the RNG state exactly."""

    task = "classification"
    output_size = 10

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                                       torch.nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


def student() -> torch.nn.Module:
    return Student()
