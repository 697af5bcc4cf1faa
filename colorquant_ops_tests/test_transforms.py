"""colorquant_ops.transforms.ColorQuantize: torchvision v2 composition, colour counts, gradients, errors."""

import PIL.Image
import pytest
import torch
import torchvision
from torch import nn
from torchvision import tv_tensors
from torchvision.transforms import v2

from colorquant_ops import ColorCNN, ops
from colorquant_ops.models import save_colorcnn
from colorquant_ops.quantizers import count_colors
from colorquant_ops.transforms import ColorQuantize

PLAIN_METHODS = ["median_cut", "octree", "kmeans"]


def smooth_images(b=2, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 4, 4, generator=g)
    return nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(0, 1)


def tiny_colorcnn(k):
    torch.manual_seed(0)
    return ColorCNN(k, width=4, color_jitter=0.0)


def make(method, k, dither=False):
    return ColorQuantize(k, method, dither=dither, model=tiny_colorcnn(k) if method == "colorcnn" else None)


@pytest.mark.parametrize("method", PLAIN_METHODS + ["colorcnn"])
@pytest.mark.parametrize("dither", [False, True])
@pytest.mark.parametrize("k", [2, 5, 16])
def test_at_most_k_colours_and_palette_reproduces_output(method, dither, k):
    x = smooth_images()
    t = make(method, k, dither)
    res = t.quantize(x)
    assert res.quantized.shape == x.shape and res.quantized.dtype == x.dtype
    assert (count_colors(res.quantized) <= k).all()
    assert res.index_map.dtype == torch.int64 and int(res.index_map.max()) < k
    assert res.palette.shape == (2, k, 3)
    torch.testing.assert_close(ops.render_index_map(res.index_map, res.palette), res.quantized, rtol=0, atol=0)
    # The transform's output is the same image.
    torch.testing.assert_close(t(x), res.quantized, rtol=0, atol=0)


@pytest.mark.parametrize("method", PLAIN_METHODS)
def test_dithered_output_uses_only_palette_colours(method):
    x = smooth_images(b=1, size=32)
    res = make(method, 4, dither=True).quantize(x)
    pixels = res.quantized[0].flatten(1).T  # [P,3]
    palette = res.palette[0]  # [K,3]
    matches = (pixels[:, None, :] == palette[None]).all(-1).any(-1)
    assert matches.all()
    # Dithering changes the index map relative to the method's own.
    plain = make(method, 4, dither=False).quantize(x)
    assert not torch.equal(plain.index_map, res.index_map)


def test_compose_on_pil_images():
    img = PIL.Image.fromarray((smooth_images(1, 40)[0].permute(1, 2, 0) * 255).to(torch.uint8).numpy())
    pipeline = v2.Compose([v2.RandomCrop(32), ColorQuantize(4, "median_cut"), v2.RandomHorizontalFlip()])
    out = pipeline(img)
    assert isinstance(out, PIL.Image.Image) and out.size == (32, 32) and out.mode == "RGB"
    assert len(out.getcolors(256)) <= 4


def test_compose_on_uint8_tensor_with_labels_and_boxes_passing_through():
    image = tv_tensors.Image((smooth_images(1, 32)[0] * 255).to(torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[2.0, 3.0, 20.0, 25.0]]), format="XYXY", canvas_size=(32, 32))
    pipeline = v2.Compose([ColorQuantize(8, "kmeans"), v2.ToDtype(torch.float32, scale=True)])
    out_image, out_boxes, label = pipeline(image, boxes, 7)
    assert isinstance(out_image, tv_tensors.Image) and out_image.dtype == torch.float32
    assert torch.equal(out_boxes, boxes) and isinstance(out_boxes, tv_tensors.BoundingBoxes)
    assert label == 7
    assert int(count_colors(out_image[None])[0]) <= 8


def test_uint8_in_uint8_out_and_palette_is_uint8():
    x = (smooth_images() * 255).round().to(torch.uint8)
    res = ColorQuantize(6, "kmeans").quantize(x)
    assert res.quantized.dtype == torch.uint8 and res.palette.dtype == torch.uint8
    assert torch.equal(ops.render_index_map(res.index_map, res.palette.float()).to(torch.uint8), res.quantized)


def test_compose_on_float_batch_with_normalize_and_leading_dims():
    x = smooth_images(b=6).reshape(2, 3, 3, 24, 24)
    pipeline = v2.Compose([ColorQuantize(3, "octree"), v2.Normalize([0.5] * 3, [0.25] * 3)])
    out = pipeline(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (count_colors(out.reshape(-1, 3, 24, 24)) <= 3).all()


def test_colorcnn_from_checkpoint_path(tmp_path):
    model = tiny_colorcnn(4)
    path = tmp_path / "colorcnn.pt"
    save_colorcnn(model, path)
    x = smooth_images()
    expected = ColorQuantize(4, "colorcnn", model=model)(x)
    torch.testing.assert_close(ColorQuantize(4, "colorcnn", model=str(path))(x), expected, rtol=0, atol=0)


def test_gradient_reaches_colorcnn_through_transform_and_classifier():
    colorcnn = tiny_colorcnn(2)
    classifier = torchvision.models.resnet18(num_classes=10)
    for p in classifier.parameters():
        p.requires_grad_(False)
    net = nn.Sequential(ColorQuantize(2, "colorcnn", model=colorcnn), classifier)
    net.train()
    classifier.eval()  # frozen classifier, as in the paper
    x = smooth_images(b=2, size=32)
    loss = nn.functional.cross_entropy(net(x), torch.tensor([1, 3]))
    loss.backward()
    grads = [p.grad for p in colorcnn.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    # Eval mode: the real K-colour output, no graph.
    net.eval()
    with torch.no_grad():
        q = net[0](x)
    assert (count_colors(q) <= 2).all()


def test_kmeans_is_deterministic_given_seed():
    x = smooth_images()
    a = ColorQuantize(8, "kmeans", seed=3)(x)
    b = ColorQuantize(8, "kmeans", seed=3)(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(num_colors=1), ValueError, "num_colors must be in \\[2, 256\\]"),
        (dict(num_colors=300), ValueError, "num_colors must be in \\[2, 256\\]"),
        (dict(num_colors=2.5), TypeError, "num_colors must be an integer"),
        (dict(num_colors=4, method="popularity"), ValueError, "method must be one of"),
        (dict(num_colors=4, method="colorcnn"), ValueError, "needs model="),
        (dict(num_colors=4, method="colorcnn", model=nn.Linear(2, 2)), TypeError, "model must be a ColorCNN"),
        (dict(num_colors=4, method="median_cut", model="x.pt"), ValueError, "only used by method='colorcnn'"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ColorQuantize(**kwargs)


def test_colorcnn_colour_count_mismatch():
    with pytest.raises(ValueError, match="model quantizes to 4 colours but num_colors=2"):
        ColorQuantize(2, "colorcnn", model=tiny_colorcnn(4))


def test_missing_checkpoint():
    with pytest.raises(FileNotFoundError, match="ColorCNN checkpoint not found"):
        ColorQuantize(2, "colorcnn", model="/nonexistent/colorcnn.pt")


def test_bad_inputs():
    t = ColorQuantize(4, "median_cut")
    la = PIL.Image.new("LA", (8, 8))
    with pytest.raises(ValueError, match="needs RGB PIL images, got mode 'LA'"):
        t(la)
    with pytest.raises(ValueError, match=r"needs images \[..., C, H, W\]"):
        t(torch.rand(8, 8))
    with pytest.raises(TypeError, match="uint8 or floating point"):
        t.quantize(torch.zeros(1, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 channels"):
        t(torch.rand(2, 8, 8))
