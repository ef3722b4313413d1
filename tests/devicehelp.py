"""Measuring on the CPU what costs on a GPU: peak tensor memory and host synchronisations.

``PeakMemory`` follows every CPU tensor storage created inside it (a dispatch mode sees
each op's outputs; a weak reference sees each storage freed) and keeps the peak of the
bytes alive at once: what a caching allocator would have to hold. ``SyncCounter`` counts
the ops that make a host wait for a GPU: reading a scalar (``.item()``, ``float()``,
``int()``, ``bool()``), ``nonzero`` and boolean-mask indexing (their output size lives on
the device). Both count ops, so they work the same on any machine.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops whose result the host must read back from the device before it can go on
SYNCING_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero",
               "aten::equal", "aten::unique_consecutive", "aten::_unique2", "aten::nonzero_static"}


class PeakMemory(TorchDispatchMode):
    """Peak bytes of CPU tensor storages alive at once among those created inside the mode."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, int] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._live:  # in-place ops and views reuse a storage
                    self._live[key] = size
                    self.now += size
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        size = self._live.pop(key, None)
        if size is not None:
            self.now -= size


class SyncCounter(TorchDispatchMode):
    """Counts syncing ops (``SYNCING_OPS``, and indexing with a boolean mask) while ``counting`` is True."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.counting = True
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.counting and _syncs(func, args):
            self.count += 1
            self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _syncs(func, args) -> bool:
    name = func.name()
    if name in SYNCING_OPS:
        return True
    if name in ("aten::index.Tensor", "aten::index_put_", "aten::index_put"):
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    return False
