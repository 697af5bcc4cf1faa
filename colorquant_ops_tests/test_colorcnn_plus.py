"""Tests of ColorCNN+ (colorquant_ops.models.ColorCNNPlus): one network for every K, its train and
eval paths, that untrained it is k-means, checkpoints, the ColorQuantize("colorcnn+") transform, and
the cluster-imitation objective (colorquant_ops.losses).

Tiny models (width 4) on small images: the file runs in seconds on a CPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from colorquant_ops import ColorCNNPlus
from colorquant_ops.losses import ColorCNNPlusLoss, boundary_loss, cluster_imitation_loss, color_usage_loss
from colorquant_ops.models import ColorCNNOutput, load_colorcnn_plus, save_colorcnn_plus
from colorquant_ops.models.colorcnn_plus import load_colorcnn_plus_checkpoint, smooth_logits
from colorquant_ops.ops import kmeans_palette, palette_distance, render_index_map
from colorquant_ops.ops import reference as ref
from colorquant_ops.transforms import ColorQuantize

WIDTH = 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _model(**kwargs):
    kwargs.setdefault("width", WIDTH)
    return ColorCNNPlus(**kwargs)


def _trained_like(model):
    """Give the zero-initialized offset head weights, as training would, so that outputs depend on them."""
    with torch.no_grad():
        model.head[-1].weight.normal_(0, 0.2)
        model.head[-1].bias.normal_(0, 0.05)
    return model


def _images(b=2, h=9, w=11):
    return torch.rand(b, 3, h, w)


@pytest.mark.parametrize("k", [2, 3, 8, 32, 256])
def test_untrained_model_is_kmeans(k):
    """Zero offsets and no refinement: the index map is k-means' (the same op, the same seed)."""
    x = _images(3, 16, 16)
    model = _model(refine_steps=0).eval()
    out = model(x, k)
    km = kmeans_palette(x, k, model.kmeans_iters, model.seed)
    torch.testing.assert_close(out.index_map, km.index_map, rtol=0, atol=0)
    # the palette is the mean input colour of each index (k-means' centres are the means of the
    # assignment before its last one, so they may differ slightly): quantized renders from it
    torch.testing.assert_close(out.quantized, render_index_map(out.index_map, out.palette))


@pytest.mark.parametrize("k", [2, 5, 64])
def test_one_model_serves_every_k(k):
    model = _trained_like(_model())
    x = _images()
    B, C, H, W = x.shape
    model.train()
    xg = x.clone().requires_grad_(True)
    out, logits = model(xg, k, return_logits=True)
    assert isinstance(out, ColorCNNOutput) and out.index_map is None
    assert out.quantized.shape == (B, C, H, W) and out.probs.shape == (B, k, H, W) and out.palette.shape == (B, k, C)
    assert logits.shape == (B, k, H, W)
    torch.testing.assert_close(out.probs, torch.softmax(logits, 1))
    out.quantized.square().mean().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["head.2.weight"].abs().sum() > 0 and grads["log_beta"] is not None
    assert grads["backbone.inc.0.weight"].abs().sum() > 0

    model.eval()
    with torch.no_grad():
        out = model(x, k)
    assert out.index_map.shape == (B, H, W) and out.index_map.dtype == torch.int64
    assert 0 <= out.index_map.min() and out.index_map.max() < k
    torch.testing.assert_close(out.quantized, render_index_map(out.index_map, out.palette))
    # the palette is made of the image's own colours: each entry the mean of its pixels
    for b in range(B):
        for c in out.index_map[b].unique():
            mask = out.index_map[b] == c
            torch.testing.assert_close(out.palette[b, c], x[b][:, mask].mean(1), rtol=1e-5, atol=1e-6)


def test_eval_assignment_is_the_nearest_feature_centre():
    """The logits are -beta(K) times squared distances of the features to the centres: the argmax index
    is the nearest centre, and the centres are where the refinement step put them (the probability-
    weighted mean of the features under k-means' assignment)."""
    model = _trained_like(_model()).eval()
    x = _images()
    with torch.no_grad():
        out, logits = model(x, 6, return_logits=True)
        features = model.features(x, 6)
        beta = model.inverse_temperature(6)
        start = kmeans_palette(features, 6, model.kmeans_iters, model.seed).palette
        centres = ref.soft_color_quantize(-beta * ref.palette_distance(features, start), features)[1]
    torch.testing.assert_close(logits, -beta * ref.palette_distance(features, centres), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.index_map, logits.argmax(1), rtol=0, atol=0)


def _smooth_reference(logits, strength):
    """float64 loops: each pixel's logits blended with the mean over its 3x3 neighbours inside the image."""
    z = logits.double()
    B, K, H, W = z.shape
    out = torch.empty_like(z)
    for i in range(H):
        for j in range(W):
            window = z[:, :, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            out[:, :, i, j] = (1 - strength) * z[:, :, i, j] + strength * window.mean(dim=(2, 3))
    return out


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 6), (1, 4, 6, 1), (1, 2, 1, 1)])
@pytest.mark.parametrize("strength", [0.1, 0.5, 1.0])
def test_smooth_logits_matches_a_loop(shape, strength):
    logits = torch.randn(*shape, dtype=torch.float64)
    torch.testing.assert_close(smooth_logits(logits, strength), _smooth_reference(logits, strength),
                               rtol=1e-12, atol=1e-12)
    assert smooth_logits(logits, 0.0) is logits


@pytest.mark.parametrize("value, error, match", [
    (-0.1, ValueError, "strength must be a finite number >= 0"),
    (1.5, ValueError, r"strength must be in \[0, 1\], got 1.5"),
    ("0.1", TypeError, "strength must be a number"),
])
def test_smooth_logits_bad_strength(value, error, match):
    with pytest.raises(error, match=match):
        smooth_logits(torch.zeros(1, 2, 3, 3), value)


def test_smoothing_changes_only_the_eval_argmax():
    """smoothing=s: the eval index map is the argmax of the smoothed logits (probs their softmax, the
    palette their pixels' mean); training mode does not see it."""
    plain = _trained_like(_model()).eval()
    smooth = _trained_like(_model(smoothing=0.6))
    smooth.load_state_dict(plain.state_dict())
    smooth.eval()
    x = _images(h=12, w=13)
    with torch.no_grad():
        _, logits = plain(x, 5, return_logits=True)
        out, smoothed = smooth(x, 5, return_logits=True)
    expected = _smooth_reference(logits, 0.6)
    torch.testing.assert_close(smoothed.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.index_map, smoothed.argmax(1), rtol=0, atol=0)
    torch.testing.assert_close(out.probs, torch.softmax(smoothed, 1), rtol=0, atol=0)
    ref_q, ref_idx, ref_pal = ref.hard_color_quantize(smoothed, x)
    torch.testing.assert_close(out.palette, ref_pal, rtol=1e-5, atol=1e-6)
    assert not torch.equal(out.index_map, logits.argmax(1))  # the test would be vacuous otherwise
    plain.train(), smooth.train()
    torch.manual_seed(1)
    a = plain(x, 5)
    torch.manual_seed(1)
    b = smooth(x, 5)
    for t, u in zip(a[:3], b[:3]):
        torch.testing.assert_close(t, u, rtol=0, atol=0)


def test_logit_noise_is_gumbel_noise_on_the_training_assignment():
    """logit_noise=s: in training mode the soft recolouring of ``logits + s * Gumbel`` (after the
    refinement steps, float32 uniforms from the global RNG; the returned logits are the noisy ones);
    evaluation mode is untouched by it (checkpoints: test_checkpoint_round_trip and the test below it)."""
    plain = _trained_like(_model())
    noisy = _model(logit_noise=0.7)
    noisy.load_state_dict(plain.state_dict())
    x = _images()
    plain.eval(), noisy.eval()
    for a, b in zip(plain(x, 5), noisy(x, 5)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # evaluation: the argmax image, no noise
    plain.train(), noisy.train()
    with torch.no_grad():
        _, logits = plain(x, 5, return_logits=True)
        torch.manual_seed(3)
        u = torch.rand(logits.shape).clamp_(1e-10, 1 - 1e-7)
        expected_logits = logits - 0.7 * torch.log(-torch.log(u))
        expected = ref.soft_color_quantize(expected_logits.double(), x.double())
        torch.manual_seed(3)
        out, noisy_logits = noisy(x, 5, return_logits=True)
    torch.testing.assert_close(noisy_logits, expected_logits, rtol=0, atol=0)
    for got, want in zip((out.quantized, out.palette, out.probs), expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(noisy_logits, logits)  # the noise is there
    xg = x.clone().requires_grad_(True)
    noisy(xg, 5).quantized.sum().backward()
    assert torch.isfinite(xg.grad).all() and noisy.log_beta.grad is not None
    assert "logit_noise=0.7" in repr(noisy) and "logit_noise" not in repr(plain)


@pytest.mark.parametrize("k", [2, 7, 64])
def test_smoothing_closed_form_matches_smoothing_the_logits_float64(k):
    """The model filters the C + 1 feature planes, not the K logit planes: the same numbers (float64)."""
    plain = _trained_like(_model()).double().eval()
    smooth = _trained_like(_model(smoothing=0.3)).double()
    smooth.load_state_dict(plain.state_dict())
    smooth.eval()
    x = _images(h=10, w=9).double()
    with torch.no_grad():
        _, logits = plain(x, k, return_logits=True)
        _, smoothed = smooth(x, k, return_logits=True)
    torch.testing.assert_close(smoothed, _smooth_reference(logits, 0.3), rtol=1e-10, atol=1e-9)


def test_smoothing_attribute_is_checked_when_used():
    model = _model().eval()
    model.smoothing = 2.0
    with pytest.raises(ValueError, match=r"smoothing must be in \[0, 1\], got 2.0"):
        model(_images(), 4)
    model.smoothing = 0.25
    assert "smoothing=0.25" in repr(model) and model.config()["smoothing"] == 0.25
    assert "model=ColorCNNPlus(max_colors=256, backbone='unet', width=4, smoothing=0.25)" in repr(
        ColorQuantize(4, "colorcnn+", model=model))


def test_k_changes_the_features():
    """The offsets see K (one input plane): the same image moves differently at K = 2 and K = 64."""
    model = _trained_like(_model()).eval()
    with torch.no_grad():
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, 0.3)
        x = _images()
        assert not torch.allclose(model.features(x, 2), model.features(x, 64))


def test_inverse_temperature_grows_with_k():
    model = _model()
    betas = [float(model.inverse_temperature(k).detach()) for k in (2, 4, 64)]
    assert betas[0] == pytest.approx(4.0) and betas[0] < betas[1] < betas[2]
    assert betas[2] == pytest.approx(4.0 * 2.2 ** 5, rel=1e-5)


def test_deterministic():
    model = _trained_like(_model()).eval()
    x = _images()
    a, b = model(x, 8), model(x, 8)
    for t, u in zip(a, b):
        torch.testing.assert_close(t, u, rtol=0, atol=0)


def test_input_normalization_clusters_normalized_pixels_and_recolours_the_input():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = _images()
    plain = _trained_like(_model()).eval()
    normed = _model(input_normalization=(mean, std)).eval()
    normed.load_state_dict(plain.state_dict())
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        a, b = plain(xn, 4), normed(x, 4)
    torch.testing.assert_close(a.index_map, b.index_map, rtol=0, atol=0)
    assert 0 <= b.quantized.min() and b.quantized.max() <= 1  # recoloured from the [0, 1] input


def test_channels_and_sizes():
    model = _model(in_channels=1).eval()
    for shape in [(1, 1, 1, 1), (2, 1, 3, 17), (1, 1, 33, 5)]:
        out = model(torch.rand(shape), 2)
        assert out.quantized.shape == shape


def test_autocast_keeps_the_input_dtype():
    model = _trained_like(_model()).train()
    x = _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, 4)
    assert out.quantized.dtype == torch.float32 and out.probs.dtype == torch.float32


@pytest.mark.parametrize("k,match", [(1, r"num_colors must be in \[2, 16\], got 1"),
                                     (17, r"num_colors must be in \[2, 16\], got 17")])
def test_k_out_of_range(k, match):
    with pytest.raises(ValueError, match=match):
        _model(max_colors=16)(_images(), k)


def test_bad_inputs():
    model = _model()
    with pytest.raises(TypeError, match="must be an integer"):
        model(_images(), 2.5)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        model([[1.0]], 2)
    with pytest.raises(ValueError, match="must be 4-D"):
        model(torch.rand(3, 4, 4), 2)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.rand(1, 4, 4, 4), 2)
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.rand(0, 3, 4, 4), 2)
    with pytest.raises(ValueError, match="finite"):
        model.eval()(torch.full((1, 3, 4, 4), float("nan")), 2)


@pytest.mark.parametrize("kwargs,match", [
    ({"backbone": "vit"}, "backbone must be one of"),
    ({"max_colors": 257}, r"max_colors must be in \[2, 256\]"),
    ({"max_colors": 1}, r"max_colors must be in \[2, 256\]"),
    ({"kmeans_iters": -1}, "kmeans_iters must be >= 0"),
    ({"refine_steps": -1}, "refine_steps must be >= 0"),
    ({"eps": -1.0}, "eps must be a finite number >= 0"),
    ({"input_normalization": ((0.5,), (0.5,))}, "needs 3 means and stds"),
    ({"smoothing": -0.5}, "smoothing must be a finite number >= 0"),
    ({"smoothing": 1.01}, r"smoothing must be in \[0, 1\]"),
    ({"logit_noise": -0.1}, "logit_noise must be a finite number >= 0"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _model(**kwargs)


def test_checkpoint_round_trip(tmp_path):
    model = _trained_like(_model(max_colors=64, kmeans_iters=3, smoothing=0.3, logit_noise=0.5)).eval()
    path = tmp_path / "plus.pt"
    save_colorcnn_plus(model, path, input_normalization=((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), dataset="cifar10")
    loaded, extra = load_colorcnn_plus_checkpoint(path)
    assert extra == {"dataset": "cifar10"}
    assert loaded.config() == {**model.config(), "input_normalization": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))}
    loaded.eval()
    x = _images()
    model.input_normalization = loaded.input_normalization
    for t, u in zip(model(x, 7), loaded(x, 7)):
        torch.testing.assert_close(t, u, rtol=0, atol=0)


@pytest.mark.parametrize("option", ["smoothing", "logit_noise"])
def test_checkpoint_without_a_later_option_loads_without_it(tmp_path, option):
    """Checkpoints from before the smoothing and logit_noise options have no such config entry: they
    load with none."""
    model = _trained_like(_model(**{option: 0.3}))
    path = tmp_path / "plus.pt"
    save_colorcnn_plus(model, path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["config"][option]
    torch.save(ckpt, path)
    assert getattr(load_colorcnn_plus(path), option) == 0.0


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ColorCNN\\+ checkpoint not found"):
        load_colorcnn_plus(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="is not a ColorCNN\\+ checkpoint"):
        load_colorcnn_plus(bad)
    model = _model()
    path = tmp_path / "plus.pt"
    save_colorcnn_plus(model, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["width"] = 8  # header says width 8, weights are width 4
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="do not fit"):
        load_colorcnn_plus(path)
    ckpt["config"] = {**model.config(), "num_colors": 2}
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="unknown config entries \\['num_colors'\\]"):
        load_colorcnn_plus(path)


# --- the transform ------------------------------------------------------------------------


def test_transform_serves_several_k_from_one_model():
    model = _trained_like(_model(max_colors=32)).eval()
    image = (torch.rand(3, 16, 16) * 255).to(torch.uint8)
    for k in (2, 4, 16):
        q = ColorQuantize(k, "colorcnn+", model=model)
        assert "ColorCNNPlus(max_colors=32" in repr(q)
        out = v2.Compose([q])(image)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        assert len(out.flatten(1).T.unique(dim=0)) <= k
        result = q.quantize(image[None].float() / 255)
        torch.testing.assert_close(result.quantized, render_index_map(result.index_map, result.palette))
        torch.testing.assert_close(result.index_map, model(image[None].float() / 255, k).index_map)


def test_transform_training_mode_is_differentiable():
    model = _trained_like(_model()).eval()
    q = ColorQuantize(4, "colorcnn+", model=model).train()
    x = _images()
    out = q(x)
    out.square().mean().backward()
    assert model.head[-1].weight.grad.abs().sum() > 0
    assert not model.training  # the model's own mode is left alone


def test_transform_errors(tmp_path):
    with pytest.raises(ValueError, match='method="colorcnn\\+" needs model='):
        ColorQuantize(4, "colorcnn+")
    with pytest.raises(ValueError, match="serves 2 to 16 colours"):
        ColorQuantize(32, "colorcnn+", model=_model(max_colors=16))
    with pytest.raises(ValueError, match="serves 2 to 16 colours"):
        ColorQuantize(1, "colorcnn+", model=_model(max_colors=16))
    with pytest.raises(TypeError, match="must be a ColorCNNPlus"):
        ColorQuantize(4, "colorcnn+", model=torch.nn.Identity())
    path = tmp_path / "plus.pt"
    save_colorcnn_plus(_model(), path)
    assert isinstance(ColorQuantize(4, "colorcnn+", model=path).model, ColorCNNPlus)
    with pytest.raises(ValueError, match="is not a ColorCNN checkpoint"):
        ColorQuantize(4, "colorcnn", model=path)


# --- the objective ------------------------------------------------------------------------


def test_cluster_imitation_target_is_the_nearest_palette_colour():
    torch.manual_seed(1)
    image, palette = torch.rand(2, 3, 5, 6), torch.rand(2, 4, 3)
    logits = torch.randn(2, 4, 5, 6, requires_grad=True)
    loss = cluster_imitation_loss(logits, image, palette)
    target = ref.palette_distance(image.double(), palette.double()).argmin(1)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    loss.backward()
    assert logits.grad.abs().sum() > 0
    # logits that pick the nearest colour by a wide margin: the loss vanishes
    sharp = -1e5 * palette_distance(image, palette)
    assert float(cluster_imitation_loss(sharp, image, palette)) < 1e-3


def test_cluster_imitation_loss_errors():
    with pytest.raises(ValueError, match="must be 4-D"):
        cluster_imitation_loss(torch.rand(2, 4, 5), torch.rand(2, 3, 5, 6), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="palette must have shape"):
        cluster_imitation_loss(torch.rand(2, 4, 5, 6), torch.rand(2, 3, 5, 6), torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="must agree in B, H and W"):
        cluster_imitation_loss(torch.rand(2, 4, 5, 6), torch.rand(2, 3, 5, 7), torch.rand(2, 4, 3))


def test_plus_loss_weights():
    model = _trained_like(_model()).train()
    x = _images()
    out, logits = model(x, 16, return_logits=True)
    cls = torch.randn(2, 10)
    target = torch.tensor([1, 2])
    crit = ColorCNNPlusLoss(imitation=2.0, alpha=0.5, boundary=0.25)
    total, terms = crit(cls, target, out, x, logits)
    assert crit.imitation_weight(16) == pytest.approx(2.0 * 4 / 8)
    expected = (F.cross_entropy(cls, target) + 1.0 * cluster_imitation_loss(logits, x, out.palette)
                + 0.5 * color_usage_loss(out.probs) + 0.25 * boundary_loss(out.probs))
    torch.testing.assert_close(total, expected)
    assert set(terms) == {"total", "cross_entropy", "imitation", "color_usage", "boundary", "distillation"}
    assert crit.boundary_weight(16) == 0.25 and crit.boundary_weight(256) == 0.25
    by_bits = ColorCNNPlusLoss(imitation=2.0, alpha=0.5, boundary=0.25, boundary_schedule="log2")
    assert by_bits.boundary_weight(16) == pytest.approx(0.25 * 4 / 8) and by_bits.boundary_weight(256) == 0.25
    scaled, _ = by_bits(cls, target, out, x, logits)
    torch.testing.assert_close(scaled, expected - (0.25 - 0.125) * boundary_loss(out.probs))
    inverse = ColorCNNPlusLoss(boundary=0.8, boundary_schedule="inverse-log2")
    assert inverse.boundary_weight(2) == 0.8 and inverse.boundary_weight(16) == pytest.approx(0.2)
    halving = ColorCNNPlusLoss(boundary=1.2, boundary_schedule="inverse")
    assert [halving.boundary_weight(K) for K in (2, 4, 8, 64)] == pytest.approx([1.2, 0.6, 0.3, 0.0375])
    with pytest.raises(ValueError, match="boundary_schedule must be one of constant, log2, inverse-log2, inverse"):
        ColorCNNPlusLoss(boundary_schedule="linear")
    off, off_terms = ColorCNNPlusLoss(imitation=0.0)(cls, target, out, x, logits)
    torch.testing.assert_close(off, F.cross_entropy(cls, target))  # terms with weight 0 are logged only
    assert off_terms["imitation"] == pytest.approx(terms["imitation"])
    with pytest.raises(ValueError, match="imitation must be a finite number >= 0"):
        ColorCNNPlusLoss(imitation=-1.0)
    with pytest.raises(TypeError, match="must be a ColorCNNOutput"):
        crit(cls, target, tuple(out), x, logits)
    assert math.isfinite(terms["total"])
