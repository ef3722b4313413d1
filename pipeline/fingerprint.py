"""Content fingerprints: what makes a teacher or a dataset the same one across runs."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["Fingerprint"]


class Fingerprint:
    """An incremental sha256 over named tensors and strings, in the order they are fed.

    Equal inputs fed in the same order give equal fingerprints on every machine: tensors
    are hashed by name, dtype, shape and little-endian contiguous bytes.
    """

    def __init__(self, kind: str):
        self._h = hashlib.sha256(kind.encode())

    def text(self, name: str, value: str) -> "Fingerprint":
        self._h.update(f"\0{name}\0{len(value)}\0{value}".encode())
        return self

    def tensor(self, name: str, t: torch.Tensor | np.ndarray) -> "Fingerprint":
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu()
            if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
                t = t.view(torch.int16)
            t = t.contiguous().numpy()
        a = np.ascontiguousarray(t)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        self._h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        self._h.update(memoryview(a).cast("B"))
        return self

    def blocks(self, name: str, dtype, shape: tuple[int, ...], blocks) -> "Fingerprint":
        """Like ``tensor`` for an array of ``dtype`` and ``shape`` fed as consecutive row
        ``blocks`` (each cast to ``dtype``): the same digest, without the array in memory."""
        dtype = np.dtype(dtype).newbyteorder("<")
        self._h.update(f"\0{name}\0{dtype.str}\0{tuple(shape)}\0".encode())
        for block in blocks:
            self._h.update(memoryview(np.ascontiguousarray(block, dtype)).cast("B"))
        return self

    def hexdigest(self) -> str:
        return "sha256:" + self._h.hexdigest()
