"""What a ``colorquant`` subcommand is, and a parser built from a list of them.

Each command module (``train``, ``evaluate``, ``quantize_files``, ``presets``, ``demo``) defines
its :class:`Command` objects; :mod:`.cli` builds the whole parser from all of them, and ``reproduce``
builds one from the commands its stages run. So no command module imports the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Sequence

__all__ = ["Command", "build_parser", "run_command"]


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: ``add_arguments(parser)`` declares its options, ``run(args)`` carries it out."""

    name: str
    help: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]


def build_parser(commands: Sequence[Command], prog: str = "colorquant",
                 description: str = "Learned colour quantization (ColorCNN) tools.") -> argparse.ArgumentParser:
    """A parser with one subcommand per entry of ``commands``; ``args.command`` names the chosen one."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in commands:
        command.add_arguments(sub.add_parser(command.name, help=command.help, description=command.description))
    return parser


def run_command(args: argparse.Namespace, commands: Sequence[Command]):
    """Run the command ``args.command`` (as parsed by :func:`build_parser` of the same ``commands``);
    errors propagate."""
    for command in commands:
        if command.name == args.command:
            return command.run(args)
    raise ValueError(f"unknown command {args.command!r}")
