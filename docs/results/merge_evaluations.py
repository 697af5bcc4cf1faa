"""One method x K table and one pair of plots from several ``colorquant evaluate`` runs (e.g. the
traditional methods, ColorCNN and ColorCNN+ measured separately with the same classifier), and
optionally the paper's picture sheet for given checkpoints.

    python docs/results/merge_evaluations.py runs/eval/traditional runs/eval/colorcnn-bundled \\
        runs/eval/plus-imit0 --out docs/results/plus --sheet \\
        --colorcnn 2=colorquant_ops/assets/weights/colorcnn-k2.pt 4=... 8=... \\
        --colorcnn-plus colorquant_ops/assets/weights/colorcnn-plus.pt

Writes ``OUT/results.md`` (the pivot tables), ``OUT/accuracy_vs_bits.png``, ``OUT/accuracy_vs_bpp.png``
and with ``--sheet`` ``OUT/sheet-1-2-3-bits.png``. RESULTS.md shows its output. All runs must have
used the same classifier (checked against each run's settings.json when present).
"""

import argparse
import json
from pathlib import Path

from colorquant_ops.experiment import evaluate, presets
from colorquant_ops.experiment.quantize_files import comparison_sheet


def _classifier(run_dir: Path):
    settings = run_dir / "settings.json"
    return json.loads(settings.read_text()).get("classifier") if settings.exists() else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="evaluate run directories (each with results.json)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--sheet", action="store_true", help="also draw the picture sheet")
    p.add_argument("--colorcnn", nargs="*", default=[], metavar="K=CKPT", help="ColorCNN checkpoint per K")
    p.add_argument("--colorcnn-plus", default=None, metavar="CKPT")
    args = p.parse_args()

    classifiers = {c for c in map(_classifier, args.runs) if c is not None}
    if len(classifiers) > 1:
        raise SystemExit(f"the runs used different classifiers: {sorted(classifiers)}")
    rows = evaluate.merge_rows(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(evaluate.pivot_tables(rows) + "\n")
    written = [args.out / "results.md", *evaluate.plot_results(rows, args.out)]
    if args.sheet:
        checkpoints = {int(k): Path(path) for k, path in (item.split("=", 1) for item in args.colorcnn)}
        sheet = comparison_sheet(presets.sheet_images(), checkpoints, presets.SHEET_KS,
                                 plus_checkpoint=args.colorcnn_plus)
        written.append(args.out / "sheet-1-2-3-bits.png")
        sheet.save(written[-1], format="PNG")
    print("\n".join(map(str, written)))


if __name__ == "__main__":
    main()
