"""The scripts RESULTS.md quotes (docs/results/): their measurements against direct computation."""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from colorquant_ops import ColorCNN
from colorquant_ops.ops import soft_color_quantize

REPO = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "docs" / "results" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soft_vs_hard_counts_what_it_says():
    soft_vs_hard = _script("soft_vs_hard").soft_vs_hard
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10, bias=False)).eval()  # sensitive to every pixel
    model = ColorCNN(2, width=4, color_norm=4.0, color_jitter=1.0).eval()  # training tricks play no part
    # Smooth random images: their colours do not average out to one grey.
    images = 3 * nn.functional.interpolate(torch.randn(12, 3, 4, 4), size=32, mode="bilinear")
    with torch.no_grad():
        model.head[-1].weight.mul_(0.01)  # probabilities near 1/2: the soft image is nearly flat
        hard_pred = classifier(model(images).quantized).argmax(1)
        soft = soft_color_quantize(model.logits(images), images).quantized
        soft_pred = classifier(soft).argmax(1)
        max_prob = model(images).probs.amax(1).mean()
    assert not torch.equal(hard_pred, soft_pred)  # the two images differ in what the classifier sees
    labels = hard_pred.clone()
    labels[:3] = (labels[:3] + 1) % 10  # three wrong on the argmax image
    loader = [(images[:5], labels[:5]), (images[5:], labels[5:])]
    r = soft_vs_hard(model, classifier, loader)
    assert r["hard"] == 9 / 12
    assert r["soft"] == int((soft_pred == labels).sum()) / 12
    torch.testing.assert_close(torch.tensor(r["max_prob"]), max_prob)

    # Saturated probabilities: the soft image is the argmax image.
    with torch.no_grad():
        model.head[-1].weight.mul_(1e6)
    r = soft_vs_hard(model, classifier, loader)
    assert r["soft"] == r["hard"] == 9 / 12 and r["max_prob"] > 0.99


def _run_dir(path, classifier, rows):
    import json

    path.mkdir()
    (path / "settings.json").write_text(json.dumps({"classifier": classifier}))
    (path / "results.json").write_text(json.dumps({"rows": rows}))
    return path


def _row(method, k, accuracy, dither="off"):
    return {"method": method, "dither": dither if k else None, "num_colors": k, "bits": None if k is None else k.bit_length() - 1,
            "accuracy": accuracy, "colors": k, "bpp": None if k is None else 0.5 * k, "images": 10, "note": ""}


def test_merge_evaluations_joins_runs_and_refuses_mixed_classifiers(tmp_path, monkeypatch, capsys):
    import sys

    import pytest

    main = _script("merge_evaluations").main
    a = _run_dir(tmp_path / "a", "clf.pt", [_row("full colour", None, 0.9), _row("kmeans", 2, 0.4)])
    b = _run_dir(tmp_path / "b", "clf.pt", [_row("full colour", None, 0.1), _row("colorcnn+", 2, 0.5, None)])
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", ["merge", str(a), str(b), "--out", str(out)])
    main()
    table = (out / "results.md").read_text()
    assert "| full colour | 90.0 |" in table  # the first run's full-colour row, once
    assert "| kmeans | 40.0 |" in table and "| colorcnn+ | 50.0 |" in table
    assert (out / "accuracy_vs_bits.png").stat().st_size > 0 and (out / "accuracy_vs_bpp.png").stat().st_size > 0
    c = _run_dir(tmp_path / "c", "other.pt", [_row("octree", 2, 0.3)])
    monkeypatch.setattr(sys, "argv", ["merge", str(a), str(c), "--out", str(out)])
    with pytest.raises(SystemExit, match="different classifiers"):
        main()


def test_jpeg_again_is_one_more_jpeg_pass_on_a_moved_grid(tmp_path):
    import io

    import numpy as np
    import pytest
    from PIL import Image

    script = _script("jpeg_again")
    rng = np.random.default_rng(0)
    pixels = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    again = script.encode_again(image, 75, 3)
    assert again.size == (32, 32) and again.mode == "RGB"
    # what it does, step by step: reflect-pad 3 rows and columns, JPEG q75 4:2:0, crop back
    padded = Image.fromarray(np.pad(pixels, ((3, 0), (3, 0), (0, 0)), mode="reflect"))
    buffer = io.BytesIO()
    padded.save(buffer, format="JPEG", quality=75, subsampling=2)
    expected = np.asarray(Image.open(buffer).convert("RGB"))[3:, 3:]
    assert np.array_equal(np.asarray(again), expected)
    assert not np.array_equal(np.asarray(again), pixels)  # lossy: the pass changed the pixels
    # the CLI: an ImageFolder copy as lossless PNGs in the same layout
    for split, name in (("train", "cat"), ("test", "dog")):
        (tmp_path / "src" / split / name).mkdir(parents=True)
        image.save(tmp_path / "src" / split / name / "0001.jpg", quality=95)
    script.main([str(tmp_path / "src"), str(tmp_path / "dst"), "--workers", "1"])
    out = tmp_path / "dst" / "test" / "dog" / "0001.png"
    with Image.open(tmp_path / "src" / "test" / "dog" / "0001.jpg") as source:
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(script.encode_again(source, 75, 3)))
    assert (tmp_path / "dst" / "train" / "cat" / "0001.png").is_file()
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "src"), str(tmp_path / "x"), "--shift", "8"])
