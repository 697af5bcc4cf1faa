"""``colorquant demo`` on its bundled sample and weights: the table, the sheet, and the paper's point.

The bundled ColorCNN checkpoints were trained with ``colorquant reproduce --preset cifar10-cpu``; on
the 500 bundled test images ColorCNN must beat every traditional quantizer at 1 bit (K = 2), as in
the seed paper, and the bundled files must match what the demo module says it bundles.
"""

from pathlib import Path

import pytest
import torch

from colorquant_ops import cli, demo
from colorquant_ops.classifiers import load_classifier
from colorquant_ops.models.colorcnn import load_colorcnn


def test_bundled_assets_load():
    classifier = load_classifier(demo.CLASSIFIER)
    assert next(classifier.parameters()).dtype == torch.float32  # stored in float16, loaded into float32
    for k in demo.DEMO_KS:
        model = load_colorcnn(demo._colorcnn_path(k))
        assert model.num_colors == k
    files = sorted((demo.SAMPLE_ROOT / "test").glob("*/*.jpg"))
    assert len(files) == demo.SAMPLE_SIZE
    assert len({f.parent.name for f in files}) == 10


def test_demo_table_sheet_and_the_papers_point(tmp_path, capsys):
    records = demo.main(out_dir=tmp_path, progress=False, num_images=2)
    out = capsys.readouterr().out
    rows = {(r["method"], r["dither"], r["num_colors"]): r for r in records}
    for k in demo.DEMO_KS:
        assert rows[("colorcnn", "off", k)]["images"] == demo.SAMPLE_SIZE
        for method in ("median_cut", "octree", "kmeans"):
            for dither in ("off", "on"):
                assert rows[(method, dither, k)]["images"] == demo.SAMPLE_SIZE
        assert f"K={k} ({k.bit_length() - 1} bit): ColorCNN" in out
    assert (tmp_path / "sheet.png").is_file() and (tmp_path / "evaluate" / "results.csv").is_file()
    best_traditional = max(r["accuracy"] for (m, _, k), r in rows.items()
                           if k == 2 and m in ("median_cut", "octree", "kmeans"))
    assert rows[("colorcnn", "off", 2)]["accuracy"] > best_traditional + 0.10


def test_rebuild_assets_from_a_missing_run(tmp_path, capsys):
    assert cli.main(["demo", "--rebuild-assets", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "colorquant: error: --rebuild-assets" in err and "classifier/final.pt" in err
