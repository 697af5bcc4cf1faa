"""Where ColorCNN's test accuracy goes: the frozen classifier on the argmax image (what evaluation and
PNG files use) against the soft image training optimizes (``soft_color_quantize`` of the same logits,
without colour_norm / colour_jitter), plus how one-hot the colour probabilities are.

    python docs/results/soft_vs_hard.py --classifier runs/cifar10-cpu/classifier/final.pt \\
        runs/cifar10-cpu/colorcnn-k2/final.pt runs/ablations/*/final.pt

Prints one markdown row per ColorCNN checkpoint, on the CIFAR-10 test split (the project's JPEG copy
unless --data-root). RESULTS.md quotes its output.
"""

import argparse

import torch
from torch.utils.data import DataLoader

from colorquant_ops.experiment import data
from colorquant_ops.models.classifiers import load_classifier
from colorquant_ops.models.colorcnn import load_colorcnn
from colorquant_ops.ops import hard_color_quantize, soft_color_quantize


@torch.no_grad()
def soft_vs_hard(colorcnn, classifier, loader) -> dict:
    """``hard``: top-1 on ColorCNN's evaluation-mode (argmax) image; ``soft``: top-1 on the soft
    recolouring of the same logits; ``max_prob``: mean over pixels of the largest colour probability."""
    colorcnn.eval()
    classifier.eval()
    hard = soft = max_prob = seen = 0
    for images, labels in loader:
        logits = colorcnn.logits(images)  # once: what eval mode's forward quantizes by argmax
        hard_image = hard_color_quantize(logits, images).quantized
        hard += int((classifier(hard_image).argmax(1) == labels).sum())
        soft_out = soft_color_quantize(logits, images, colorcnn.temperature, colorcnn.eps)
        soft += int((classifier(soft_out.quantized).argmax(1) == labels).sum())
        max_prob += float(soft_out.probs.amax(1).mean((1, 2)).sum())
        seen += labels.shape[0]
    return {"hard": hard / seen, "soft": soft / seen, "max_prob": max_prob / seen}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="ColorCNN checkpoints (colorquant train's final.pt)")
    p.add_argument("--classifier", required=True, help="the frozen classifier they were trained against")
    p.add_argument("--data-root", default=None)
    p.add_argument("--test-subset", type=int, default=None)
    args = p.parse_args(argv)
    root, cache = data.data_locations(argparse.Namespace(data_root=args.data_root, dataset="cifar10", cache_dir=None))
    test_set = data.build_dataset("cifar10", root, "test", data.test_transform("cifar10"), subset=args.test_subset,
                                  cache_dir=cache)
    loader = DataLoader(test_set, batch_size=500)
    classifier = load_classifier(args.classifier)
    print(f"{len(test_set)} CIFAR-10 test images\n")
    print("| checkpoint | K | colour_norm | colour_jitter | temperature | straight-through | logit noise | "
          "top-1 argmax image | top-1 soft image | mean max probability |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.checkpoints:
        m = load_colorcnn(path)
        m.input_normalization = None  # the loader already normalizes, as in training
        r = soft_vs_hard(m, classifier, loader)
        print(f"| {path} | {m.num_colors} | {m.color_norm:g} | {m.color_jitter:g} | {m.temperature:g} | "
              f"{'yes' if m.straight_through else 'no'} | {m.logit_noise:g} | {100 * r['hard']:.1f} | {100 * r['soft']:.1f} | "
              f"{r['max_prob']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
