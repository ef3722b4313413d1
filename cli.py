"""The `distill` command line: each command parses its flags and calls one function."""

from __future__ import annotations

import importlib
import json
import sys

import click
from click.core import ParameterSource

from distill import __version__
from distill.errors import ConfigError, DistillError
from distill.pipeline.config import Setting, build_config, load_toml, settings
from distill.pipeline.formatting import data_summary, human_bytes
from distill.pipeline.progress import loss_text

__all__ = ["cli", "main"]


class _UserError(click.ClickException):
    """A DistillError on its way out: one line on stderr, the error's exit status (2)."""

    def __init__(self, err: DistillError):
        super().__init__(" ".join(str(err).splitlines()))
        self.exit_code = err.exit_code

    def show(self, file=None) -> None:
        click.echo(f"distill: error: {self.message}", err=True, file=file)


class _UsageError(click.UsageError):
    """A bad flag or argument: one line naming it and where the help is, exit status 2 (not click's three lines)."""

    def __init__(self, err: click.UsageError):
        super().__init__(" ".join(err.format_message().split()).rstrip("."), err.ctx)

    def show(self, file=None) -> None:
        where = f"`{self.ctx.command_path} --help`" if self.ctx is not None else "`distill --help`"
        click.echo(f"distill: error: {self.message}; see {where}", err=True, file=file)


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DistillError as err:
            raise _UserError(err) from err
        except click.UsageError as err:
            raise _UsageError(err) from err

    def make_context(self, *args, **kwargs) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as err:
            raise _UsageError(err) from err


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="distill", message="%(prog)s %(version)s")
def cli() -> None:
    """Offline knowledge distillation through a soft-label store."""


# --- commands whose flags are a stage config's settings ------------------------------------------

class _StageCommand(click.Command):
    """A command whose flags are the settings of a stage's config class (``package.module:Class``).

    The class is imported only when the command runs or shows its help, so `distill --help`
    and `--version` do not load torch. Its settings become options in ``settings`` order (the
    command's own first, then the shared data, model and device flags), before ``--json`` and
    ``--config``.
    """

    def __init__(self, *args, config: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_path, self._config_class = config, None

    @property
    def config_class(self) -> type:
        if self._config_class is None:
            module, _, name = self.config_path.partition(":")
            self._config_class = getattr(importlib.import_module(module), name)
            own = [_option(s) for s in settings(self._config_class) if s.cli]
            self.params = [p for p in self.params if isinstance(p, click.Argument)] + own + \
                [p for p in self.params if not isinstance(p, click.Argument)]
        return self._config_class

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        self.config_class  # noqa: B018 - loads the options on first use
        return super().get_params(ctx)


def _option(s: Setting) -> click.Option:
    """The click option of one setting: its flags, type (a choice, repeated for a tuple) and help.

    No click default: a flag the user did not give must not override the --config file.
    """
    names = [s.flag, *s.aliases, s.name]
    if s.type is bool:
        return click.Option(names, flag_value=not s.negated, default=None, help=s.help_text)
    kind = {int: int, float: float, str: str}[s.type]
    if s.choices is not None:
        kind = click.Choice([*s.choices, *s.value_aliases])
        return click.Option(names, type=kind, multiple=s.multiple, help=s.help_text,
                            metavar="[" + "|".join(s.choices) + "]")
    return click.Option(names, type=kind, multiple=s.multiple, help=s.help_text)


def _stage_command(name: str, config: str):
    """``@cli.command(name)`` whose options come from the config class at ``config``."""
    return cli.command(name, cls=_StageCommand, config=config)


def _json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as one JSON line.")


_config_option = click.option("--config", type=click.Path(dir_okay=False),
                              help="TOML file with these settings (keys: the flag names; top level or a [command] table; "
                                   "relative paths from its directory); flags override it.")


def _stage_config(ctx: click.Context, params: dict):
    """The command's config from its --config file and the flags the user gave (not click's defaults)."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    flags = {k: v for k, v in params.items() if k != "config" and ctx.get_parameter_source(k) in given}
    path = params.get("config")
    stages = {name: cmd.config_class for name, cmd in cli.commands.items() if isinstance(cmd, _StageCommand)}
    file_values = load_toml(path, ctx.command.name, stages) if path else {}
    return _in_this_process(build_config(ctx.command.config_class, file_values, flags, source=path or ""))


def _in_this_process(config):
    """A ``memory://`` store lives as long as this process: one written is gone when the command ends (a note),
    and one to read cannot have been written by another command (refused)."""
    for name in ("out", "labels", "path"):
        url = getattr(config, name, None)
        if not (isinstance(url, str) and url.startswith("memory://")):
            continue
        if name != "out":
            raise ConfigError(f"{url} cannot hold a store here: memory:// lives only as long as the command that "
                               "wrote it; pass the path or URL generate-labels wrote to")
        click.echo(f"distill: note: --out {url} is held in this process's memory and is gone when the command "
                   "ends: pass a path or an s3:// / gs:// URL to keep it", err=True)
    return config


@_stage_command("inspect", "distill.stages.inspection:InspectConfig")
@click.argument("path")
@_json_option("the summary")
@click.pass_context
def inspect(ctx: click.Context, as_json: bool, **params) -> None:
    """Summarise a soft-label store (a path or fsspec URL) or a training run directory.

    A store: its settings, size, shard completeness, and the teacher's distributions (top-k
    mass percentiles and histogram, entropy over the k+1 buckets), read shard by shard. A run
    directory: its key settings, steps done, last training and held-out metrics, final model.
    """
    from distill.stages.inspection import format_lineage, format_provenance, format_run, inspect_path

    result = inspect_path(_stage_config(ctx, params))
    summary = result["summary"]
    if as_json:
        click.echo(json.dumps(summary, default=str))
    elif result["kind"] == "run":
        click.echo(format_run(summary))
    else:  # a store's provenance and lineage as their own indented blocks, after its figures
        figures = {k: v for k, v in summary.items() if k not in ("provenance", "lineage")}
        click.echo("\n".join([_format_summary(figures), *format_provenance(summary.get("provenance")),
                              *format_lineage(summary.get("lineage") or [])]))
    if summary.get("damaged_shards") or summary.get("figures_skipped_shards"):
        sys.exit(1)


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    metrics = summary.get("metrics", {})
    evaluation = metrics.get("eval", {})
    parts = [f"{k} {v:.4g}" for k, v in evaluation.items() if isinstance(v, float)]
    trained = summary.get("trainable_params", summary["params"])  # fewer with a LoRA adapter
    count = f"{trained:,}" if trained == summary["params"] else f"{trained:,} of {summary['params']:,}"
    loss = loss_text(metrics)  # the last logged window's: ``loss 0.1234 (soft 0.1000, ce 0.5000)``
    click.echo(f"trained {count} parameters; model saved in {summary['out']}/model"
               + (f"; final {loss}" if loss else "") + (f"; held-out {', '.join(parts)}" if parts else ""))


@_stage_command("train-student", "distill.stages.train:StudentConfig")
@_json_option("the summary")
@_config_option
@click.pass_context
def train_student(ctx: click.Context, as_json: bool, **params) -> None:
    """Train a student from the soft-label store (the teacher is never loaded).

    Rerunning the same command resumes from the newest checkpoint.
    """
    from distill.stages.train import train_student as run

    _print_summary(run(_stage_config(ctx, params)), as_json)


@_stage_command("train-teacher", "distill.stages.train:TrainConfig")
@_json_option("the summary")
@_config_option
@click.pass_context
def train_teacher(ctx: click.Context, as_json: bool, **params) -> None:
    """Train a model on hard labels alone: a teacher, or the from-scratch baseline.

    Rerunning the same command resumes from the newest checkpoint.
    """
    from distill.stages.train import train_teacher as run

    _print_summary(run(_stage_config(ctx, params)), as_json)


@_stage_command("generate-labels", "distill.stages.generate:GenerateConfig")
@_json_option("the result")
@_config_option
@click.pass_context
def generate_labels(ctx: click.Context, as_json: bool, **params) -> None:
    """Run the teacher once over the data and write its soft labels to a store.

    Rerunning the same command resumes: complete shards are kept, the rest redone.
    """
    from distill.stages.generate import generate_labels as run

    result = run(_stage_config(ctx, params))
    if as_json:
        click.echo(json.dumps(result))
    elif "store" in result:
        click.echo(_format_summary(result["store"]))


@_stage_command("import-labels", "distill.stages.importing:ImportConfig")
@_json_option("the result")
@_config_option
@click.pass_context
def import_labels(ctx: click.Context, as_json: bool, **params) -> None:
    """Write a store from top-k labels made elsewhere: per-position lists of ids and log-probabilities.

    The tail is what the log-probabilities leave of 1; the store holds temperature 1 only, unless the source
    also has the teacher's tempered normalisers (--tempered-lse-column with --temperature).
    """
    from distill.stages.importing import import_labels as run

    result = run(_stage_config(ctx, params))
    click.echo(json.dumps(result, default=str) if as_json else _format_summary(result["store"]))


@_stage_command("evaluate", "distill.stages.evaluate:EvaluateConfig")
@_json_option("the report")
@_config_option
@click.pass_context
def evaluate(ctx: click.Context, as_json: bool, **params) -> None:
    """Report a model's metric (accuracy, or perplexity for causal LMs), size, latency and throughput.

    With --teacher also the teacher's figures, top-1 agreement and KL with it, and how much
    of the teacher the model keeps; with --labels, agreement with the stored teacher.
    """
    from distill.stages.evaluate import evaluate_model, format_report

    report = evaluate_model(_stage_config(ctx, params))
    click.echo(json.dumps(report) if as_json else format_report(report))


@_stage_command("quantize", "distill.stages.quantize:QuantizeConfig")
@_json_option("the summary")
@_config_option
@click.pass_context
def quantize(ctx: click.Context, as_json: bool, **params) -> None:
    """Quantize a trained model's Linear layers to int8; evaluate accepts the output directory."""
    from distill.stages.quantize import quantize_model

    summary = quantize_model(_stage_config(ctx, params))
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        click.echo(f"quantized {summary['quantized_linears']} Linear layer(s) ({summary['method']}); "
                   f"{summary['bytes_before']:,} -> {summary['bytes_after']:,} bytes; model saved in {summary['out']}/model")
        if "note" in summary:
            click.echo(f"note: {summary['note']}")


@_stage_command("report", "distill.stages.report:ReportConfig")
@click.argument("runs", nargs=-1)
@_config_option
@click.pass_context
def report(ctx: click.Context, **params) -> None:
    """Write one self-contained HTML page about RUNS: training curves, comparison bars, the store's top-k mass.

    RUNS are run directories of train-teacher and train-student (and quantize output
    directories); the page embeds its PNG plots, so it can be sent on its own.
    """
    from distill.stages.report import write_report

    click.echo(f"report written to {write_report(_stage_config(ctx, params))}")


@cli.command()
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the demo's runs, store, evaluation and report.")
@click.option("--quick", is_flag=True, help="A much smaller version (about a minute), for a first look or a test.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda or cuda:N for every stage (the int8 student is evaluated on the CPU).")
def demo(out_dir: str, quick: bool, device: str) -> None:
    """Run the whole recipe on mnist1d: teacher, labels, three students, int8, evaluation, report.

    Rerunning resumes: finished steps are not redone.
    """
    from distill.stages.demo import DemoSettings, run_demo

    run_demo(out_dir, DemoSettings.quick() if quick else DemoSettings(), device=device)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point. User errors (DistillError, bad flags) exit with status 2."""
    cli.main(args=argv, prog_name="distill")


# --- human-readable summary -------------------------------------------------------------

def _format_value(key: str, value: object) -> str:
    if value is None:
        return "-"
    if key == "data" and isinstance(value, dict):  # what generate-labels made of the documents
        return data_summary(value)
    if key == "payload_bytes" and isinstance(value, (int, float)):
        return f"{human_bytes(value)} ({value:,} bytes)"
    if key.startswith("bytes_per_") and isinstance(value, (int, float)):
        return f"{value:,.2f} B"
    if key in ("bytes_by_array", "bytes_per_position_by_array") and isinstance(value, dict):  # largest first
        unit = (lambda v: f"{v:,.2f} B") if key.endswith("position_by_array") else human_bytes
        return ", ".join(f"{name} {unit(v)}" for name, v in value.items()) or "-"
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


def _format_figures(summary: dict, complete: int | None) -> list[str]:
    """Pops `inspect`'s distribution figures from ``summary`` into it as text; returns the histogram's lines."""
    percentiles = summary.pop("topk_mass_percentiles", None)
    if percentiles is None:
        return []
    summary["topk_mass_percentiles"] = ", ".join(f"{k} {v:.4f}" for k, v in percentiles.items())
    entropy = summary.pop("teacher_entropy_buckets_mean")
    summary["teacher_entropy_buckets_mean"] = f"{entropy:.4f} nats (over the k+1 buckets: a lower bound of the true entropy)"
    if "unique_ids_mean" in summary:
        summary["unique_ids_mean"] = summary.pop("unique_ids_mean")
    read, positions = summary.pop("figures_shards_read"), summary.pop("figures_positions")
    sampled, skipped = summary.pop("figures_sampled"), summary.pop("figures_skipped_shards")
    summary["figures_from"] = (f"a sample of {read:,} of {complete or read:,} shards" if sampled
                               else f"all {read:,} complete shards") + f" ({positions:,} positions)" + (
                               "; --sample 0 reads every shard" if sampled else "") + (
                               f"; damaged shard(s) {', '.join(map(str, skipped))} skipped" if skipped else "")
    counts = summary.pop("topk_mass_histogram")
    edges = [i / len(counts) for i in range(len(counts) + 1)]
    scale = 40 / max(max(counts), 1)
    return ["topk mass histogram (positions per bin)"] + [
        f"  {a:.1f}-{b:.1f}  {'#' * round(c * scale):<40}  {c:,}" for a, b, c in zip(edges, edges[1:], counts)]


def _format_summary(summary: dict) -> str:
    summary = dict(summary)
    damaged = summary.pop("damaged_shards", None)
    complete = summary.get("shards_complete")
    if "shards_complete" in summary and "shards_total" in summary:
        summary["shards"] = f"{summary.pop('shards_complete'):,} of {summary.pop('shards_total'):,} complete"
    histogram = _format_figures(summary, complete)
    summary = {k: v for k, v in summary.items() if v is not None}
    width = max((len(k) for k in summary), default=0)
    lines = [f"{k.replace('_', ' '):<{width}}  {_format_value(k, v)}" for k, v in summary.items()] + histogram
    if damaged is not None:
        lines.append(f"{'verify':<{width}}  " + ("ok" if not damaged else f"{len(damaged)} damaged shard(s)"))
        lines += [f"  shard {d['shard']}: {d['error']}" for d in damaged]
    return "\n".join(lines)


if __name__ == "__main__":  # `python -m distill.cli ...`, e.g. under torchrun --module
    main()
