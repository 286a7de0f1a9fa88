"""The ``kcompress`` command line: a thin layer over the Python API.

Commands are loaded lazily (``LAZY_COMMANDS`` maps a name to ``module:attribute``) and every command module
imports TensorFlow inside its functions, so ``kcompress --help`` answers without importing it.
Exit codes (:func:`handle_errors`): 0 success; 1 a user error (a :class:`KcompressError`: bad input, a gate that
failed, or an OS error about a file the user named, such as a missing or unreadable path) printed as one ``Error:``
line on stderr; 2 a usage error (:class:`UsageError` and click's own); 3 an internal error, i.e. a kcompress bug (any
other exception): one ``Error:`` line naming the exception, with the full traceback saved to
``$XDG_CACHE_HOME/kcompress/crash-*.txt`` (``~/.cache/kcompress`` by default, the temp folder when that is not
writable); 130 interrupted. ``--debug`` shows tracebacks inline instead.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import sys
import tempfile
import time
import traceback

import click

from kcompress import __version__
from kcompress.errors import KcompressError

__all__ = ["main", "LAZY_COMMANDS", "handle_errors", "EXIT_OK", "EXIT_USER", "EXIT_USAGE", "EXIT_BUG", "crash_dir"]

EXIT_OK, EXIT_USER, EXIT_USAGE, EXIT_BUG = 0, 1, 2, 3

# name -> (module:attribute, one-line help shown by `kcompress --help`)
LAZY_COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("kcompress.cli.measure:demo", "The whole flow on built-in data: train, distill, prune, int8, report."),
    "baseline": ("kcompress.cli.measure:baseline", "Measure a model: size, FLOPs, accuracy, latency, memory."),
    "quantize": ("kcompress.cli.quantize:quantize", "Post-training quantization to a .tflite (dynamic/float16/int8/int16x8)."),
    "evaluate": ("kcompress.cli.measure:evaluate", "Accuracy metrics of a Keras model, .tflite or .onnx on data."),
    "bench": ("kcompress.cli.measure:bench", "Latency, throughput and memory of a .tflite (LiteRT) or .onnx (ONNX Runtime)."),
    "export": ("kcompress.cli.export:export", "Export a Keras model to ONNX, checked against Keras in ONNX Runtime."),
    "prune": ("kcompress.cli.prune:prune", "Prune with fine-tuning: magnitude sparsity or structured channel removal."),
    "qat": ("kcompress.cli.quantize:qat", "Quantization-aware training to an int8 .tflite, compared with PTQ."),
    "sensitivity": ("kcompress.cli.quantize:sensitivity", "Per-layer int8 sensitivity, ranked (table + JSON)."),
    "distill": ("kcompress.cli.distill:distill_cmd", "Train a smaller student from a teacher (knowledge distillation)."),
    "inspect": ("kcompress.cli.measure:inspect_cmd", "Layers, ops, shapes, dtypes and quantization of a model or .tflite."),
    "run": ("kcompress.cli.pipeline:run", "Run a pipeline config (distill, prune, quantize, validate, bench)."),
    "report": ("kcompress.cli.pipeline:report", "Report over run folders: tables and Pareto plots."),
    "compare": ("kcompress.cli.pipeline:compare", "Two models, .tflite or .onnx files side by side (A/B test)."),
    "monitor": ("kcompress.cli.monitor:monitor", "Drift check of new inputs against a model's reference statistics."),
    "recommend": ("kcompress.cli.pipeline:recommend", "Write a pipeline config for a target and budgets."),
    "config": ("kcompress.cli.pipeline:config", "Show the config defaults or validate a config file."),
    "sweep": ("kcompress.cli.sweep:sweep", "Sweep and ablate pipeline settings (Optuna; local or Ray): Pareto front."),
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


# OS errors about the user's files and machine (a path they named, a full disk): user errors, exit 1. Any other
# OSError (no errno, e.g. raised by a library about its own state) is treated as a kcompress bug.
_USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EIO,
                errno.ELOOP, errno.EXDEV, errno.ENOTEMPTY, errno.EBUSY, errno.ETXTBSY}


def _user_os_error(e: BaseException) -> bool:
    if not isinstance(e, OSError):
        return False
    return isinstance(e, _USER_OS_ERRORS) or e.errno in _USER_ERRNOS


def _os_error_line(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{': '.join(names)}: {what}" if names else what


def crash_dir() -> str:
    """Where tracebacks of internal errors are saved: ``$XDG_CACHE_HOME/kcompress`` (``~/.cache/kcompress``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "kcompress")


def _save_crash(e: BaseException) -> str | None:
    """Writes the traceback of ``e`` (with the command line and versions) to a new file; its path, or None."""
    import platform

    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = "".join([
        f"kcompress {__version__}, Python {platform.python_version()}, {platform.platform()}\n",
        f"command: {' '.join(sys.argv)}\n",
        f"time: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n\n",
        *traceback.format_exception(type(e), e, e.__traceback__),
    ])
    for folder in (crash_dir(), os.path.join(tempfile.gettempdir(), "kcompress")):
        try:
            os.makedirs(folder, exist_ok=True)
            for n in range(100):
                path = os.path.join(folder, f"crash-{stamp}-{os.getpid()}{f'-{n}' if n else ''}.txt")
                try:
                    with open(path, "x", encoding="utf-8") as f:
                        f.write(text)
                    return path
                except FileExistsError:
                    continue
        except OSError:
            continue
    return None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else ""


def _one_line(e: BaseException) -> str:
    """The whole message of an error on one line (a library's multi-line text, quoted inside ours, included)."""
    return " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


def _internal_error(e: BaseException) -> None:
    """One line saying this is a kcompress bug and where its traceback went; exit 3."""
    path = _save_crash(e)
    first = _first_line(e)
    what = f"{type(e).__name__}: {first}" if first else type(e).__name__
    where = (f"traceback saved to {path}" if path else "the traceback could not be saved")
    click.echo(f"Error: internal error, a kcompress bug ({what}); {where}; please report it (--debug shows the "
               "traceback here)", err=True)
    if path is None:  # nowhere to keep it: the traceback itself, rather than losing it
        traceback.print_exception(type(e), e, e.__traceback__, file=sys.stderr)
    sys.exit(EXIT_BUG)


def handle_errors(fn):
    """The exit-code contract of every command (see the module docstring and ``kcompress --help``).

    User errors (:class:`KcompressError`, OS errors about the user's files such as a missing or unreadable path, out
    of memory) print one ``Error:`` line and exit 1 (:class:`UsageError`: 2). Any other exception is a kcompress bug:
    one ``Error:`` line with its type and first line, the traceback saved to a crash file, exit 3. With ``--debug``
    every exception propagates with its traceback. Click's own exceptions (usage errors, ``Abort``, ``Exit``) pass
    through to click."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        except Exception as e:
            if debug:
                raise
            if isinstance(e, KcompressError):
                click.echo(f"Error: {_one_line(e) or type(e).__name__}", err=True)
                sys.exit(e.exit_code)
            if _user_os_error(e):
                click.echo(f"Error: {_os_error_line(e)}", err=True)
                sys.exit(EXIT_USER)
            if isinstance(e, MemoryError):
                click.echo("Error: out of memory (try a smaller --batch-size or less data)", err=True)
                sys.exit(EXIT_USER)
            _internal_error(e)

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

    \b
    Exit codes:
      0  success
      1  user error: bad input, a missing or unreadable file, a failed --max-drop gate (one "Error:" line)
      2  usage error: a bad flag or option value
      3  internal error, a kcompress bug: the traceback is saved to ~/.cache/kcompress/crash-*.txt
         ($XDG_CACHE_HOME/kcompress; --debug prints it instead); please report it
    """


if __name__ == "__main__":  # pragma: no cover
    main()
