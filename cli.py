"""The `distill` command line: each command parses its flags and calls one function."""

from __future__ import annotations

import json
import sys

import click

from distill import __version__
from distill.errors import DistillError

__all__ = ["cli", "main"]


class _UserError(click.ClickException):
    """A DistillError on its way out: one line on stderr, the error's exit status (2)."""

    def __init__(self, err: DistillError):
        super().__init__(" ".join(str(err).splitlines()))
        self.exit_code = err.exit_code

    def show(self, file=None) -> None:
        click.echo(f"distill: error: {self.message}", err=True, file=file)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DistillError as err:
            raise _UserError(err) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="distill", message="%(prog)s %(version)s")
def cli() -> None:
    """Offline knowledge distillation through a soft-label store."""


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.option("--verify", is_flag=True, help="Check every shard's checksums; exit 1 if any is damaged.")
def inspect(store: str, as_json: bool, verify: bool) -> None:
    """Summarise the soft-label store at STORE (a path or fsspec URL)."""
    from distill.storage import open_store

    reader = open_store(store)
    summary = reader.summary(verify=verify)  # with --verify, reads and checks every shard once
    damaged = summary.get("damaged_shards", [])
    click.echo(json.dumps(summary) if as_json else _format_summary(summary))
    if damaged:
        sys.exit(1)


@cli.command()
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the demo's store, checkpoints and report.")
def demo(out_dir: str) -> None:
    """Run the whole recipe end to end on a built-in dataset (minutes on a laptop CPU)."""
    from distill.stages.demo import run_demo

    run_demo(out_dir)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. User errors (DistillError, bad flags) exit with status 2."""
    cli.main(args=argv, prog_name="distill")


# --- human-readable summary -------------------------------------------------------------

def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _format_value(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "payload_bytes" and isinstance(value, (int, float)):
        return f"{_human_bytes(value)} ({value:,} bytes)"
    if key.startswith("bytes_per_") and isinstance(value, (int, float)):
        return f"{value:,.2f} B"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else _format_value("", v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _format_summary(summary: dict) -> str:
    summary = dict(summary)
    damaged = summary.pop("damaged_shards", None)
    if "shards_complete" in summary and "shards_total" in summary:
        summary["shards"] = f"{summary.pop('shards_complete'):,} of {summary.pop('shards_total'):,} complete"
    width = max((len(k) for k in summary), default=0)
    lines = [f"{k.replace('_', ' '):<{width}}  {_format_value(k, v)}" for k, v in summary.items()]
    if damaged is not None:
        lines.append(f"{'verify':<{width}}  " + ("ok" if not damaged else f"{len(damaged)} damaged shard(s)"))
        lines += [f"  shard {d['shard']}: {d['error']}" for d in damaged]
    return "\n".join(lines)
