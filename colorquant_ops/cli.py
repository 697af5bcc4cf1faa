"""Command line interface: ``colorquant <command>`` (also ``python -m colorquant_ops``)."""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colorquant", description="Learned colour quantization (ColorCNN) tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize generated images through the fused ops; prints a table, writes a sheet")
    demo.add_argument("--out-dir", default="runs/demo", help="where the picture sheet goes (default: runs/demo)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(out_dir=args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
