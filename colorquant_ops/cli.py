"""Command line interface: ``colorquant <command>`` (also ``python -m colorquant_ops``).

* ``demo``: ColorCNN against the traditional quantizers on bundled images with bundled weights.
* ``train-classifier``: train the full-colour classifier ColorCNN is judged by.
* ``train``: train ColorCNN against a frozen classifier checkpoint.
* ``evaluate``: accuracy / colours used / bits per pixel of quantization methods and JPEG.
* ``quantize``: image files to palette PNGs (any method and K), a table and a side-by-side sheet.
* ``reproduce``: a named preset of the above, e.g. the paper's CIFAR-10 experiment, in one command.

Bad arguments, missing data and unreadable checkpoints end with one ``colorquant: error: ...``
message on stderr and exit status 2, without a traceback.
"""

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import evaluate, presets, quantize_files, train

    parser = argparse.ArgumentParser(prog="colorquant", description="Learned colour quantization (ColorCNN) tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="ColorCNN vs median cut / octree / k-means at K=2,4,8 on bundled CIFAR-10 "
                          "images with bundled weights: a table and a picture sheet (offline, CPU)")
    demo.add_argument("--out-dir", default="runs/demo", help="where the table and sheet go (default: runs/demo)")
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="tqdm progress bar (default: on)")
    demo.add_argument("--rebuild-assets", metavar="RUN_DIR", default=None,
                      help="regenerate the bundled weights and image sample from a finished "
                           "'colorquant reproduce --preset cifar10-cpu' run directory, then stop")
    cls = sub.add_parser("train-classifier", help="train the full-colour classifier (paper: SGD 0.1, 60 epochs)",
                         description="Train a full-colour classifier; writes a run directory (see colorquant_ops.train).")
    train.add_classifier_arguments(cls)
    cnn = sub.add_parser("train", help="train ColorCNN against a frozen classifier checkpoint",
                         description="Train ColorCNN through a frozen classifier; writes a run directory.")
    train.add_colorcnn_arguments(cnn)
    ev = sub.add_parser("evaluate", help="a frozen classifier on quantized (and JPEG) test images; one table",
                        description="Evaluate colour quantization methods and JPEG through a frozen classifier; "
                                    "writes results.csv/.json/.md and plots into a run directory.")
    evaluate.add_evaluate_arguments(ev)
    qu = sub.add_parser("quantize", help="image files to palette PNGs; a table and a side-by-side sheet",
                        description="Quantize image files with each method and K into palette PNGs "
                                    "(OUT/<stem>-<method>[-dither]-k<K>.png), print colours used, PNG bytes, "
                                    "bits per pixel and PSNR, and draw OUT/sheet.png.")
    quantize_files.add_quantize_arguments(qu)
    rep = sub.add_parser("reproduce", help="run a named preset: classifier, ColorCNN per K, evaluate",
                         description="Run a whole experiment (train-classifier, train per K, evaluate) from a "
                                     "named preset; done stages are skipped, interrupted ones resumed.")
    presets.add_reproduce_arguments(rep)
    return parser


def run_command(args: argparse.Namespace):
    """Run a parsed ``colorquant`` command; errors propagate."""
    from . import demo, evaluate, presets, quantize_files, train

    if args.command == "demo":
        if args.rebuild_assets is not None:
            written = demo.rebuild_assets(args.rebuild_assets)
            print(f"wrote {len(written)} files under {demo.ASSETS}")
            return written
        return demo.main(out_dir=args.out_dir, progress=args.progress)
    command = {"train-classifier": train.train_classifier, "train": train.train_colorcnn,
               "evaluate": evaluate.evaluate, "quantize": quantize_files.quantize_images,
               "reproduce": presets.reproduce}[args.command]
    return command(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_command(args)
    except (ValueError, OSError) as exc:  # bad arguments, missing data (DatasetNotFoundError), bad checkpoints
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
