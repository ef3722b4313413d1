"""The `distill` command line: each command parses its flags and calls one function."""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

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


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.option("--verify", is_flag=True, help="Check every shard's checksums; exit 1 if any is damaged.")
@click.option("--sample", type=int, help="Shards read for a store's top-k mass and entropy figures: N evenly spaced, "
                                         "0 every shard [default: every shard up to 1 GiB of payload, else a sample].")
def inspect(path: str, as_json: bool, verify: bool, sample: int | None) -> None:
    """Summarise a soft-label store (a path or fsspec URL) or a training run directory.

    A store: its settings, size, shard completeness, and the teacher's distributions (top-k
    mass percentiles and histogram, entropy over the k+1 buckets), read shard by shard. A run
    directory: its key settings, steps done, last training and held-out metrics, final model.
    """
    from distill.stages.inspection import InspectConfig, format_run, inspect_path

    result = inspect_path(InspectConfig(path, verify=verify, sample=sample))
    summary = result["summary"]
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        click.echo(format_run(summary) if result["kind"] == "run" else _format_summary(summary))
    if summary.get("damaged_shards") or summary.get("figures_skipped_shards"):
        sys.exit(1)


def _flags(ctx: click.Context, params: dict) -> dict:
    """The flags the user gave (not click's defaults), so they override --config values only when given."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in params.items() if k != "config" and ctx.get_parameter_source(k) in given}


def _stage_config(ctx: click.Context, cls, command: str, params: dict, aliases: dict | None = None):
    from distill.pipeline.config import build_config, load_toml

    path = params.get("config")
    file_values = load_toml(path, command) if path else {}
    return build_config(cls, file_values, _flags(ctx, params), source=path or "", aliases=aliases)


def _data_options(f):
    """The flags that say how a data spec is read (shared by every stage that reads data)."""
    for decorator in reversed([
        click.option("--split", help="Data split [default: train]."),
        click.option("--tokenizer", help="Tokenizer for text data: a Hugging Face directory or `bytes`."),
        click.option("--seq-len", type=int, help="Tokens per sequence cut from text files; max length for text columns [default: 256]."),
        click.option("--text-column", help="Column of text [default: text]."),
        click.option("--ids-column", help="Column of token ids [default: input_ids]."),
        click.option("--label-column", help="Column of class labels [default: label]."),
        click.option("--limit", type=int, help="Use only the first N examples."),
    ]):
        f = decorator(f)
    return f


def _training_options(f):
    """The flags train-student and train-teacher share."""
    for decorator in reversed([
        click.option("--data", help="Data spec, as for generate-labels."),
        click.option("--out", help="Run directory: config, metrics.jsonl, checkpoints, the final model."),
        click.option("--epochs", type=int, help="Passes over the data [default: 1]."),
        click.option("--steps", type=int, help="Optimiser steps (instead of --epochs)."),
        click.option("--batch-size", type=int, help="Examples per batch [default: 32]."),
        click.option("--grad-accum", type=int, help="Batches per optimiser step [default: 1]."),
        click.option("--lr", type=float, help="Peak learning rate of AdamW [default: 1e-3]."),
        click.option("--weight-decay", type=float, help="AdamW weight decay [default: 0.01]."),
        click.option("--warmup-steps", type=int, help="Linear warm-up steps [default: 5% of the steps]."),
        click.option("--min-lr-ratio", type=float, help="Cosine decay ends at lr times this [default: 0.1]."),
        click.option("--clip-grad", type=float, help="Gradient-norm clipping [default: 1.0]."),
        click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto]."),
        click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="auto: bf16 autocast on CUDA [default: auto]."),
        click.option("--seed", type=int, help="Seed of the data order and dropout [default: 0]."),
        click.option("--eval-every", type=int, help="Evaluate on --eval-split every N steps (and at the end)."),
        click.option("--eval-split", help="Held-out split to evaluate, e.g. test."),
        click.option("--eval-data", help="Data spec of the held-out split [default: --data]."),
        click.option("--checkpoint-every", type=int, help="Checkpoint every N steps (and at the end) [default: 500]."),
        click.option("--log-every", type=int, help="Metrics line every N steps [default: 10]."),
        click.option("--workers", type=int, help="DataLoader worker processes [default: 1]."),
        click.option("--shuffle-buffer", type=int, help="Examples per shuffled block of shards [default: about 65,536 positions' worth]."),
        click.option("--overwrite", is_flag=True, default=None, help="Start over in a run directory holding another run."),
        click.option("--weights", help="Initial weights: .safetensors, or a state dict (weights_only)."),
        click.option("--trust-remote-code", is_flag=True, default=None, help="Let a Hugging Face model run code from its directory."),
        click.option("--task", type=click.Choice(["classification", "causal-lm"]), help="The task [default: inferred]."),
        _data_options,
        click.option("--no-progress", "progress", flag_value=False, default=None, help="No progress bar or log lines."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line."),
        click.option("--config", type=click.Path(dir_okay=False), help="TOML file with these settings; flags override it."),
    ]):
        f = decorator(f)
    return f


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, default=str))
        return
    metrics = summary.get("metrics", {})
    evaluation = metrics.get("eval", {})
    parts = [f"{k} {v:.4g}" for k, v in evaluation.items() if isinstance(v, float)]
    click.echo(f"trained {summary['params']:,} parameters; model saved in {summary['out']}/model"
               + (f"; held-out {', '.join(parts)}" if parts else ""))


@cli.command("train-student")
@click.option("--labels", help="The soft-label store written by generate-labels.")
@click.option("--student", "model", help="Student: a built-in (mlp, cnn, gpt), a Hugging Face directory, or package.module:factory.")
@click.option("--loss", type=click.Choice(["kl", "reverse-kl", "jsd", "skew-kl", "argmax"]),
              help="Divergence to the teacher's top-k + tail; argmax: cross-entropy on the teacher's top-1 id (hard pseudo-labels) [default: kl].")
@click.option("--temperature", type=float, help="Softening temperature; the store must hold it [default: 2].")
@click.option("--alpha", type=float, help="Weight of the hard-label cross-entropy: alpha*CE + (1-alpha)*T^2*soft [default: 0.5].")
@click.option("--beta", type=float, help="Beta of the generalised JSD [default: 0.5].")
@click.option("--skew", type=float, help="Skew of skew-kl (DistiLLM's alpha) [default: 0.1].")
@click.option("--no-tail", "tail", flag_value=False, default=None,
              help="Drop the tail bucket and renormalise over the k stored ids (what most offline tools do; for comparison).")
@_training_options
@click.pass_context
def train_student(ctx: click.Context, as_json: bool, **params) -> None:
    """Train a student from the soft-label store (the teacher is never loaded).

    Rerunning the same command resumes from the newest checkpoint.
    """
    from distill.stages.train import StudentConfig, train_student as run

    _print_summary(run(_stage_config(ctx, StudentConfig, "train-student", params, {"student": "model"})), as_json)


@cli.command("train-teacher")
@click.option("--model", help="The model to train: a built-in (mlp, cnn, gpt), a Hugging Face directory, or package.module:factory.")
@_training_options
@click.pass_context
def train_teacher(ctx: click.Context, as_json: bool, **params) -> None:
    """Train a model on hard labels alone: a teacher, or the from-scratch baseline.

    Rerunning the same command resumes from the newest checkpoint.
    """
    from distill.stages.train import TrainConfig, train_teacher as run

    _print_summary(run(_stage_config(ctx, TrainConfig, "train-teacher", params)), as_json)


@cli.command("generate-labels")
@click.option("--teacher", help="Teacher: a Hugging Face directory, package.module:factory, a TorchScript file, or a built-in (mlp, cnn, gpt).")
@click.option("--data", help="Data: mnist1d, a .parquet/.jsonl/.txt file or directory, a saved `datasets` dataset, or package.module:function.")
@click.option("--out", help="The store to write: a directory path or fsspec URL.")
@click.option("--task", type=click.Choice(["classification", "causal-lm"]), help="The teacher's task [default: inferred from the teacher].")
@click.option("--method", type=click.Choice(["topk", "sample"]), help="Top-k ids with exact log-probs and tail, or sampled ids [default: topk].")
@click.option("--k", type=int, help="Top-k size [default: 64, or every class when fewer].")
@click.option("--samples", type=int, help="Draws per position for --method sample [default: 12].")
@click.option("--temperature", "temperatures", type=float, multiple=True, help="Store the exact normaliser for this temperature; repeat for several [default: 1 and 2].")
@click.option("--sample-temperature", type=float, help="Temperature of the distribution draws come from [default: 1].")
@click.option("--batch-size", type=int, help="Examples per teacher forward pass [default: 32].")
@click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto].")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), help="auto: bfloat16 autocast on CUDA, float32 on CPU [default: auto].")
@click.option("--backend", type=click.Choice(["zarr", "parquet"]), help="Store backend [default: zarr].")
@click.option("--value-encoding", type=click.Choice(["sqrt", "lossless"]), help="How log-probs are stored [default: sqrt].")
@click.option("--examples-per-shard", type=int, help="Shard size [default: about 65,536 positions].")
@click.option("--shard", help="I/N: do only this job-array task's shards; seal with --finalize afterwards.")
@click.option("--finalize", is_flag=True, default=None, help="Only check that every shard is complete and seal the store.")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a store made with other settings.")
@click.option("--repair", is_flag=True, default=None, help="First check every complete shard's checksums and redo the damaged ones.")
@click.option("--weights", help="Teacher weights: .safetensors, or a state dict (loaded with weights_only=True).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Let a Hugging Face teacher run code from its directory.")
@_data_options
@click.option("--seed", type=int, help="Seed of the draws for --method sample [default: 0].")
@click.option("--queue-size", type=int, help="Labelled batches that may wait for the writer thread [default: 8].")
@click.option("--no-progress", "progress", flag_value=False, default=None, help="No progress bar or log lines.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file with these settings; flags override it.")
@click.pass_context
def generate_labels(ctx: click.Context, as_json: bool, **params) -> None:
    """Run the teacher once over the data and write its soft labels to a store.

    Rerunning the same command resumes: complete shards are kept, the rest redone.
    """
    from distill.stages.generate import GenerateConfig, generate_labels as run

    result = run(_stage_config(ctx, GenerateConfig, "generate-labels", params))
    if as_json:
        click.echo(json.dumps(result))
    elif "store" in result:
        click.echo(_format_summary(result["store"]))


def _evaluate_data_options(f):
    """``_data_options`` with evaluate's own default split, test."""
    f = _data_options(f)
    for param in f.__click_params__:
        if param.name == "split":
            param.help = "Data split to evaluate [default: test]."
    return f


@cli.command()
@click.option("--model", help="The model to evaluate: a run directory, Hugging Face directory, TorchScript file, built-in or package.module:factory.")
@click.option("--data", help="Data spec, as for generate-labels.")
@click.option("--teacher", help="A teacher model spec: agreement with it, its own figures and the retention line.")
@click.option("--labels", help="A soft-label store of this data (instead of --teacher): agreement with the stored teacher.")
@click.option("--device", help="auto, cpu, cuda or cuda:N [default: auto; the CPU for a dynamic-int8 model].")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), help="auto: bf16 autocast on CUDA [default: auto].")
@click.option("--batch-size", type=int, help="Examples per batch for the metric and agreement [default: 64].")
@click.option("--throughput-batch", type=int, help="Examples per batch for throughput [default: 256, or 16 sequences for causal LMs].")
@click.option("--warmup", type=int, help="Untimed passes before timing [default: 3].")
@click.option("--repeats", type=int, help="Timed passes; latency and throughput are their median [default: 10].")
@click.option("--weights", help="Weights for --model: .safetensors, or a state dict (weights_only).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Let Hugging Face models run code from their directories.")
@click.option("--task", type=click.Choice(["classification", "causal-lm"]), help="The task [default: inferred].")
@_evaluate_data_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file with these settings; flags override it.")
@click.pass_context
def evaluate(ctx: click.Context, as_json: bool, **params) -> None:
    """Report a model's metric (accuracy, or perplexity for causal LMs), size, latency and throughput.

    With --teacher also the teacher's figures, top-1 agreement and KL with it, and how much
    of the teacher the model keeps; with --labels, agreement with the stored teacher.
    """
    from distill.stages.evaluate import EvaluateConfig, evaluate_model, format_report

    report = evaluate_model(_stage_config(ctx, EvaluateConfig, "evaluate", params))
    click.echo(json.dumps(report) if as_json else format_report(report))


@cli.command()
@click.option("--model", help="The model to quantize: a run directory, a Hugging Face causal LM, a built-in or package.module:factory.")
@click.option("--out", help="Output run directory: model/model.pt (TorchScript), model/model.json, summary.json.")
@click.option("--method", help="dynamic-int8 (CPU) or weight-only-int8 (GPU target) [default: dynamic-int8].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace another quantized model in --out.")
@click.option("--weights", help="Weights for --model: .safetensors, or a state dict (weights_only).")
@click.option("--trust-remote-code", is_flag=True, default=None, help="Let a Hugging Face model run code from its directory.")
@click.option("--task", type=click.Choice(["classification", "causal-lm"]), help="The task [default: inferred].")
@click.option("--data", help="Examples to trace a model that TorchScript cannot compile [default: the run directory's data].")
@_data_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file with these settings; flags override it.")
@click.pass_context
def quantize(ctx: click.Context, as_json: bool, **params) -> None:
    """Quantize a trained model's Linear layers to int8; evaluate accepts the output directory."""
    from distill.stages.quantize import QuantizeConfig, quantize_model

    summary = quantize_model(_stage_config(ctx, QuantizeConfig, "quantize", params))
    if as_json:
        click.echo(json.dumps(summary, default=str))
    else:
        click.echo(f"quantized {summary['quantized_linears']} Linear layer(s) ({summary['method']}); "
                   f"{summary['bytes_before']:,} -> {summary['bytes_after']:,} bytes; model saved in {summary['out']}/model")
        if "note" in summary:
            click.echo(f"note: {summary['note']}")


@cli.command()
@click.argument("runs", nargs=-1)
@click.option("--out", help="The HTML file to write [default: report.html].")
@click.option("--labels", help="A soft-label store for the top-k mass histogram [default: the stores the student runs name].")
@click.option("--evaluation", multiple=True, help="JSON from `distill evaluate --json` for the comparison; repeat for several files.")
@click.option("--title", help="The page's title [default: distill report].")
@click.option("--sample", type=int, help="Shards read for each store's histogram, as for inspect --sample.")
@click.option("--config", type=click.Path(dir_okay=False), help="TOML file with these settings; flags override it.")
@click.pass_context
def report(ctx: click.Context, **params) -> None:
    """Write one self-contained HTML page about RUNS: training curves, comparison bars, the store's top-k mass.

    RUNS are run directories of train-teacher and train-student (and quantize output
    directories); the page embeds its PNG plots, so it can be sent on its own.
    """
    from distill.stages.report import ReportConfig, write_report

    click.echo(f"report written to {write_report(_stage_config(ctx, ReportConfig, 'report', params))}")


@cli.command()
@click.option("--out", "out_dir", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for the demo's runs, store, evaluation and report.")
@click.option("--quick", is_flag=True, help="A much smaller version (about a minute), for a first look or a test.")
def demo(out_dir: str, quick: bool) -> None:
    """Run the whole recipe on mnist1d: teacher, labels, three students, int8, evaluation, report.

    Rerunning resumes: finished steps are not redone.
    """
    from distill.stages.demo import DemoSettings, run_demo

    run_demo(out_dir, DemoSettings.quick() if quick else DemoSettings())


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
