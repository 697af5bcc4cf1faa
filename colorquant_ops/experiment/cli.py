"""Command line interface: ``colorquant <command>`` (also ``python -m colorquant_ops``).

* ``demo``: ColorCNN against the traditional quantizers on bundled images with bundled weights.
* ``train-classifier``: train the full-colour classifier ColorCNN is judged by.
* ``train``: train ColorCNN against a frozen classifier checkpoint.
* ``evaluate``: accuracy / colours used / bits per pixel of quantization methods and JPEG.
* ``quantize``: image files to palette PNGs (any method and K), a table and a side-by-side sheet.
* ``reproduce``: a named preset of the above, e.g. the paper's CIFAR-10 experiment, in one command.
* ``gradcam``: what the frozen classifier looks at (Grad-CAM) on the original and each method's image.

The parser is built from each command module's :class:`~.commands.Command`; the command modules
never import this one. Bad arguments, missing data and unreadable checkpoints end with one
``colorquant: error: ...`` message on stderr and exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import commands, data, demo, evaluate, gradcam, presets, quantize_files, train

__all__ = ["COMMANDS", "build_parser", "error_message", "main", "run_command"]

#: Every ``colorquant`` subcommand, in the order ``--help`` lists them.
COMMANDS = (demo.COMMAND, train.CLASSIFIER_COMMAND, train.COLORCNN_COMMAND, evaluate.COMMAND,
            quantize_files.COMMAND, presets.COMMAND, gradcam.COMMAND)


def build_parser() -> argparse.ArgumentParser:
    return commands.build_parser(COMMANDS)


def run_command(args: argparse.Namespace):
    """Run a parsed ``colorquant`` command; errors propagate."""
    return commands.run_command(args, COMMANDS)


def error_message(exc: BaseException) -> str:
    """The one line ``colorquant`` prints for ``exc``: the first line of its message (a
    :class:`~.data.DatasetNotFoundError` adds one line listing the paths it looked at; its full
    message, with how to supply the data, is the exception's text for Python callers)."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    message = lines[0]
    if isinstance(exc, FloatingPointError):
        message += " (the run diverged: try a smaller --lr)"
    if isinstance(exc, data.DatasetNotFoundError) and exc.paths:
        message += "\n  looked for: " + ", ".join(map(str, exc.paths)) + " (pass --data-root DIR)"
    return message


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_command(args)
    # bad arguments, missing data (DatasetNotFoundError), bad checkpoints and images, a full disk,
    # a diverging run (FloatingPointError)
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"{parser.prog}: error: {error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
