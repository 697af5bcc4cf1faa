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
