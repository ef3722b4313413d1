"""Numbers for people: byte sizes in one set of units (IEC: KiB, MiB, ...) across every command,
and what a data set's documents became."""

from __future__ import annotations

__all__ = ["byte_unit", "human_bytes", "data_summary"]

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


def data_summary(stats: dict) -> str:
    """A data set's ``stats`` (``ExampleSet.stats``, as a store's manifest keeps them under
    ``extra["data"]``) as one line: ``3 documents -> 12 sequences, 10,000 tokens (0 dropped), ...``."""
    parts = [f"{stats.get('documents', 0):,} documents -> {stats.get('sequences', 0):,} sequences, "
             f"{stats.get('tokens', 0):,} tokens ({stats.get('dropped_tokens', 0):,} dropped"
             + (f", {stats['truncated_tokens']:,} truncated" if "truncated_tokens" in stats else "") + ")"]
    if "positions" in stats:
        parts.append(f"{stats['positions']:,} positions")
    if stats.get("chat"):
        parts.append(f"chat, positions on {stats['chat'].get('train_on', 'assistant')} tokens")
    if stats.get("stride"):
        parts.append(f"windows overlap by {stats['stride']:,} tokens")
    if stats.get("packed"):
        parts.append(f"packed, attention {stats.get('attention', 'unknown')}")
    return ", ".join(parts)
