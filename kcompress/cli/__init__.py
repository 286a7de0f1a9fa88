"""The ``kcompress`` command line: a thin layer over the Python API.

Commands are loaded lazily (``LAZY_COMMANDS`` maps a name to ``module:attribute``) and every command module
imports TensorFlow inside its functions, so ``kcompress --help`` answers without importing it.
Errors from kcompress (``KcompressError``) print one line on stderr and exit non-zero; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import functools
import importlib
import sys

import click

from kcompress import __version__
from kcompress.errors import KcompressError

__all__ = ["main", "LAZY_COMMANDS", "handle_errors"]

# name -> (module:attribute, one-line help shown by `kcompress --help`)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kcompress.cli.measure:demo", "The whole flow on built-in data: train, distill, prune, int8, report."),
    "baseline": ("kcompress.cli.measure:baseline", "Measure a model: size, FLOPs, accuracy, latency, memory."),
    "quantize": ("kcompress.cli.quantize:quantize", "Post-training quantization to a .tflite (dynamic/float16/int8/int16x8)."),
    "evaluate": ("kcompress.cli.measure:evaluate", "Accuracy metrics of a Keras model or .tflite file on data."),
    "bench": ("kcompress.cli.measure:bench", "Latency, throughput and memory of a .tflite in the LiteRT interpreter."),
    "prune": ("kcompress.cli.prune:prune", "Prune with fine-tuning: magnitude sparsity or structured channel removal."),
    "qat": ("kcompress.cli.quantize:qat", "Quantization-aware training to an int8 .tflite, compared with PTQ."),
    "sensitivity": ("kcompress.cli.quantize:sensitivity", "Per-layer int8 sensitivity, ranked (table + JSON)."),
    "distill": ("kcompress.cli.distill:distill_cmd", "Train a smaller student from a teacher (knowledge distillation)."),
    "inspect": ("kcompress.cli.measure:inspect_cmd", "Layers, ops, shapes, dtypes and quantization of a model or .tflite."),
    "run": ("kcompress.cli.pipeline:run", "Run a pipeline config (distill, prune, quantize, validate, bench)."),
    "report": ("kcompress.cli.pipeline:report", "Report over run folders: tables and Pareto plots."),
    "compare": ("kcompress.cli.pipeline:compare", "Two models or .tflite files side by side (A/B test)."),
    "recommend": ("kcompress.cli.pipeline:recommend", "Write a pipeline config for a target and budgets."),
    "config": ("kcompress.cli.pipeline:config", "Show the config defaults or validate a config file."),
    "device": ("kcompress.cli.device:device", "Benchmark .tflite files on Android devices over adb."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when they run (or their own --help is asked)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(LAZY_COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in LAZY_COMMANDS:
            module_name, attr = LAZY_COMMANDS[cmd_name][0].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, LAZY_COMMANDS[name][1]) for name in self.list_commands(ctx) if name in LAZY_COMMANDS]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def handle_errors(fn):
    """Turns KcompressError (and a few predictable OS errors) into one stderr line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except KcompressError as e:
            if debug:
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)
        except (OSError, ValueError, MemoryError) as e:
            if debug:
                raise
            click.echo(f"Error: {type(e).__name__}: {e}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="kcompress")
@click.option("--debug", is_flag=True, help="Show Python tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """kcompress: distill, prune and quantize Keras models into small, fast int8 TFLite (LiteRT) files.

    \b
    The usual flow:
      kcompress baseline model.keras --data val/          # measure what you start from
      kcompress quantize model.keras --data train/ --mode int8 --val-data val/
      kcompress evaluate model_int8.tflite --data val/ --reference model.keras
      kcompress bench model_int8.tflite --threads 1,4

    DATA is an image folder (one sub-folder per class), an .npz with arrays x and y, or a built-in
    name (digits, digits:train, digits:val). Run `kcompress COMMAND --help` for each command.
    """


if __name__ == "__main__":  # pragma: no cover
    main()
