"""Numbers for people: byte sizes in one set of units (IEC: KiB, MiB, ...) across every command."""

from __future__ import annotations

__all__ = ["byte_unit", "human_bytes"]

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def byte_unit(n: float) -> tuple[int, str]:
    """The largest unit that ``n`` bytes fill at least once: (bytes per unit, its name); B below 1 KiB."""
    scale, unit = 1, _UNITS[0]
    for name in _UNITS[1:]:
        if abs(n) < scale * 1024:
            break
        scale, unit = scale * 1024, name
    return scale, unit


def human_bytes(n: float, decimals: int = 2) -> str:
    """``n`` bytes as text: whole bytes below 1 KiB, else ``decimals`` decimals (``11.77 MiB``)."""
    scale, unit = byte_unit(n)
    return f"{n:.0f} B" if scale == 1 else f"{n / scale:.{decimals}f} {unit}"
