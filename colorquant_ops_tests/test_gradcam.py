"""Grad-CAM (colorquant_ops.experiment.gradcam): against a hand computation with torch.autograd.grad,
its hooks and the model's flags, a frozen classifier; and ``colorquant gradcam`` end to end."""

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from colorquant_ops.experiment import cli
from colorquant_ops.experiment.demo import SAMPLE_ROOT
from colorquant_ops.experiment.gradcam import default_layer, grad_cam, overlay_heatmap, run_gradcam
from colorquant_ops.models.classifiers import CifarAlexNet
from colorquant_ops.models.pretrained import pretrained_classifier


def _tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(5, 3),
    )


def _by_hand(net, x, targets, rectified=False):
    """Grad-CAM written out: the activations and their gradient computed step by step."""
    x = x.detach()
    h = F.relu(net[0](x))
    pre = net[2](h)
    act = F.relu(pre) if rectified else pre
    logits = net[7](net[5](net[4](act if rectified else F.relu(pre))))  # dropout: eval, the identity
    score = logits[torch.arange(x.shape[0]), targets].sum()
    (grad,) = torch.autograd.grad(score, act)
    cam = F.relu((grad.mean((2, 3), keepdim=True) * act).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.flatten(1).amax(1).clamp_min(1e-30)[:, None, None]
    return cam.detach(), logits.softmax(1)[torch.arange(x.shape[0]), targets].detach()


def _hooks(net):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in net.modules())


@pytest.mark.parametrize("layer, rectified", [(None, False), ("2", False), ("3", True)])
def test_matches_the_hand_computation(layer, rectified):
    net = _tiny_cnn().eval()
    x = torch.randn(3, 3, 12, 12)
    targets = torch.tensor([0, 2, 1])
    result = grad_cam(net, x, targets, layer=layer)
    cam, prob = _by_hand(net, x, targets, rectified)
    assert result.cam.shape == (3, 12, 12)
    torch.testing.assert_close(result.cam, cam, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.probability, prob)
    torch.testing.assert_close(result.prediction, net(x).argmax(1))
    # one image at a time gives the same maps (each image's gradient is its own)
    for i in range(3):
        torch.testing.assert_close(grad_cam(net, x[i:i + 1], int(targets[i]), layer=layer).cam[0], cam[i],
                                   rtol=1e-5, atol=1e-6)


def test_default_target_is_the_prediction_and_size_is_the_output():
    net = _tiny_cnn().eval()
    x = torch.randn(2, 3, 12, 12)
    result = grad_cam(net, x, size=(30, 20))
    assert result.cam.shape == (2, 30, 20)
    torch.testing.assert_close(grad_cam(net, x, net(x).argmax(1), size=(30, 20)).cam, result.cam)


def test_hooks_removed_and_flags_unchanged():
    net = _tiny_cnn().train()
    net[0].requires_grad_(False)  # partly frozen
    flags = [p.requires_grad for p in net.parameters()]
    x = torch.randn(2, 3, 12, 12)
    expected = grad_cam(_tiny_cnn().eval(), x, 1).cam  # same weights (seeded), eval mode
    with torch.no_grad():  # works under no_grad too
        result = grad_cam(net, x, 1)
    torch.testing.assert_close(result.cam, expected)  # ran in eval mode: dropout off
    assert all(m.training for m in net.modules())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert all(p.grad is None for p in net.parameters())
    assert _hooks(net) == 0
    assert not x.requires_grad


def test_hooks_removed_on_error():
    net = _tiny_cnn().train()
    with pytest.raises(ValueError, match="target_classes"):
        grad_cam(net, torch.randn(2, 3, 12, 12), [0, 5])
    with pytest.raises(RuntimeError):  # the forward pass itself fails: 4 channels
        grad_cam(net, torch.randn(2, 4, 12, 12), 0)
    assert _hooks(net) == 0
    assert all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="not a module"):
        grad_cam(net, torch.randn(1, 3, 12, 12), 0, layer="nope")
    with pytest.raises(ValueError, match="float"):
        grad_cam(net, torch.zeros(1, 3, 12, 12, dtype=torch.uint8), 0)


def test_frozen_bundled_classifier():
    model = pretrained_classifier("cifar10-airbench93")
    assert not any(p.requires_grad for p in model.parameters())
    assert default_layer(model) is model.groups[2].conv2
    alexnet = CifarAlexNet()
    assert default_layer(alexnet) is alexnet.features[10]
    x = torch.randn(4, 3, 32, 32)
    result = grad_cam(model, x, [0, 1, 2, 3])
    assert result.cam.shape == (4, 32, 32)
    assert result.cam.min() >= 0 and result.cam.max() <= 1
    assert torch.all((result.cam.flatten(1).amax(1) == 1) | (result.cam.flatten(1).amax(1) == 0))
    with torch.no_grad():
        probs = model(x).softmax(1)
    torch.testing.assert_close(result.probability, probs[torch.arange(4), torch.tensor([0, 1, 2, 3])])
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert _hooks(model) == 0


def test_overlay_blends_half_and_half():
    image = Image.new("RGB", (4, 4), (0, 0, 0))
    out = np.asarray(overlay_heatmap(image, torch.zeros(4, 4)))
    import matplotlib
    heat = np.round(np.asarray(matplotlib.colormaps["jet"](0.0)[:3]) * 255 * 0.5)
    assert np.abs(out[0, 0].astype(float) - heat).max() <= 1


# --- the command --------------------------------------------------------------------------

def _two_images():
    return [sorted((SAMPLE_ROOT / "test" / name).glob("*.jpg"))[0] for name in ("bird", "ship")]


def test_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["gradcam", *map(str, _two_images()), "--num-colors", "2", "4", "--colorcnn", "cifar10-k2", "cifar10-k4",
            "-o", str(out)]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "gradcam-sheet.png" in captured.out
    sheet = Image.open(out / "gradcam-sheet.png")
    assert sheet.mode == "RGB"
    # the same run as a function, for the layout: rows = images x K, columns = original + 6 methods
    result = run_gradcam(cli.build_parser().parse_args(argv))
    assert result["rows"] == 4
    assert result["columns"] == ["original", "ColorCNN", "ColorCNN+", "median cut", "octree", "k-means (PIL)",
                                 "k-means++"]
    boxes = result["boxes"]
    assert len(boxes) == 4 and all(len(row) == 7 for row in boxes)
    assert all((r - l, b - t) == (96, 96) for row in boxes for (l, t, r, b) in row)
    assert sheet.size == Image.open(result["sheet"]).size
    width, height = sheet.size
    assert max(r for row in boxes for (_, _, r, _) in row) < width and boxes[-1][0][3] < height
    assert width >= 7 * 96 and height >= 4 * 96
    pixels = np.asarray(sheet)
    l, t, r, b = boxes[0][0]
    assert pixels[t:b, l:r].std() > 10  # a heat map, not an empty cell
    records = result["records"]
    assert len(records) == 2 * 2 * 6
    # the bundled ColorCNN+ (the default --colorcnn-plus) serves both K with one network
    plus = [r for r in records if r["method"] == "colorcnn+"]
    assert sorted(r["num_colors"] for r in plus) == [2, 2, 4, 4]
    assert all(1 <= r["colors"] <= r["num_colors"] for r in plus)
    assert {r["true_class"] for r in records} == {"bird", "ship"}
    assert all(0 <= r["probability"] <= 1 for r in records)
    assert (out / "gradcam.md").read_text().count("\n") == 2 + len(records)


def _error(argv, capsys):
    status = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return status, err


@pytest.mark.parametrize("extra, message", [
    (["--num-colors", "1"], "--num-colors: K must be in 2..256"),
    (["--methods", "posterize"], "unknown method 'posterize'"),
    (["--classifier", "nothing.pt"], "--classifier: nothing.pt is neither a file nor a bundled name"),
    (["--colorcnn", "cifar10-k2", "--methods", "octree"], "--colorcnn is given but colorcnn is not among"),
    (["--colorcnn-plus", "cifar10-plus", "--methods", "octree"], "--colorcnn-plus is given but colorcnn+ is not among"),
    (["--colorcnn-plus", "nothing.pt", "--methods", "colorcnn+", "--num-colors", "2"],
     "--colorcnn-plus: nothing.pt is neither a file nor a bundled name"),
    (["--layer", "features.99", "--methods", "octree", "--num-colors", "2"], "layer 'features.99' is not a module"),
    (["--alpha", "2"], "--alpha must be in [0, 1]"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    status, err = _error(["gradcam", _two_images()[0], "-o", out, *extra], capsys)
    assert status == 2
    assert err.startswith("colorquant: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_other_sizes_resized_with_a_note_or_refused(tmp_path, capsys):
    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    out = tmp_path / "out"
    args = ["gradcam", path, "--methods", "median_cut", "--num-colors", "2", "-o", out]
    status, err = _error(args + ["--no-resize"], capsys)
    assert status == 2 and "48x40 pixels, the classifier takes 32x32" in err and "\n" not in err
    assert not out.exists()
    assert cli.main([str(a) for a in args]) == 0
    captured = capsys.readouterr()
    assert "48x40 resized to 32x32" in captured.err
    assert "| - | 2 | median_cut |" in (out / "gradcam.md").read_text()  # no folder class: the prediction


def test_parser_lists_the_command():
    parser = cli.build_parser()
    args = parser.parse_args(["gradcam", "x.jpg"])
    assert isinstance(args, argparse.Namespace) and args.classifier == "cifar10-airbench93" and args.cell_size == 96
