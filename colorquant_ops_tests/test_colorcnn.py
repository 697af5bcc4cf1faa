"""Tests of the ColorCNN model (colorquant_ops.models): shapes on any size, the
train/eval quantization paths, the paper's training-only palette tricks,
gradients, channels_last, autocast and argument errors.

The models are tiny (width 8) and the images small so that the file runs in
seconds on a CPU.
"""

import pytest
import torch
from torch import nn

from colorquant_ops.models import ColorCNN, ColorCNNOutput, DnCNN, UNet
from colorquant_ops.ops import hard_color_quantize, soft_color_quantize

WIDTH = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _model(num_colors=8, **kwargs):
    kwargs.setdefault("width", WIDTH)
    return ColorCNN(num_colors, **kwargs)


def _check_train(model, x, num_colors):
    model.train()
    x = x.clone().requires_grad_(True)
    out = model(x)
    assert isinstance(out, ColorCNNOutput)
    B, C, H, W = x.shape
    assert out.quantized.shape == (B, C, H, W)
    assert out.probs.shape == (B, num_colors, H, W)
    assert out.palette.shape == (B, num_colors, C)
    assert out.index_map is None
    torch.testing.assert_close(out.probs.sum(1), torch.ones(B, H, W))
    out.quantized.square().mean().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.isfinite(x.grad).all()


def _check_eval(model, x, num_colors):
    model.eval()
    with torch.no_grad():
        out = model(x)
    B, C, H, W = x.shape
    assert out.quantized.shape == (B, C, H, W)
    assert out.probs.shape == (B, num_colors, H, W)
    assert out.palette.shape == (B, num_colors, C)
    assert out.index_map.shape == (B, H, W)
    assert out.index_map.dtype == torch.int64
    assert 0 <= out.index_map.min() and out.index_map.max() < num_colors


@pytest.mark.parametrize(
    "batch,height,width",
    [(1, 1, 1), (2, 1, 1), (1, 16, 16), (2, 1, 7), (2, 3, 5), (1, 5, 3), (2, 17, 33), (1, 33, 17)],
)
def test_unet_shapes_any_size(batch, height, width):
    # Includes sizes below the U-Net's 16x down-sampling and single images of at
    # most 16x16 in training mode (BatchNorm needs more than one value per channel
    # at the 1/16-scale bottleneck).
    model = _model(8)
    x = torch.randn(batch, 3, height, width)
    _check_train(model, x, 8)
    _check_eval(model, x, 8)


@pytest.mark.parametrize("num_colors", [2, 3, 16, 256])
def test_num_colors_shapes(num_colors):
    model = _model(num_colors)
    x = torch.randn(2, 3, 5, 7)
    _check_train(model, x, num_colors)
    _check_eval(model, x, num_colors)


@pytest.mark.parametrize("size", [(1, 1), (3, 5), (9, 4)])
def test_dncnn_shapes(size):
    model = _model(16, backbone="dncnn")
    x = torch.randn(2, 3, *size)
    _check_train(model, x, 16)
    _check_eval(model, x, 16)


def test_backbone_architectures():
    # The paper's widths at width=64 (milesial U-Net, bilinear variant).
    unet = UNet(3, width=64)
    convs = [m.out_channels for m in unet.modules() if isinstance(m, nn.Conv2d)]
    # inc, down1..down4, up1..up4: two convs each.
    assert convs == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512, 256, 256, 128, 128, 64, 64, 64, 64]
    assert [unet.up1.conv[0].in_channels, unet.up2.conv[0].in_channels] == [1024, 512]
    assert [unet.up3.conv[0].in_channels, unet.up4.conv[0].in_channels] == [256, 128]
    assert unet.out_channels == 64
    # Widths scale by width / 64.
    convs16 = [m.out_channels for m in UNet(3, width=16).modules() if isinstance(m, nn.Conv2d)]
    assert convs16 == [c // 4 for c in convs]

    dncnn = DnCNN(3, width=WIDTH)
    convs = [m for m in dncnn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 17
    assert sum(isinstance(m, nn.BatchNorm2d) for m in dncnn.modules()) == 15
    assert all(c.out_channels == WIDTH and c.bias is None for c in convs)

    model = _model(5, backbone="dncnn")
    head = [m for m in model.head.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in head] == [(WIDTH, 256, (1, 1)), (256, 5, (1, 1))]
    assert head[0].bias is not None and head[1].bias is None


def test_unet_output_size_matches_input():
    unet = UNet(3, width=WIDTH).eval()
    for h, w in [(1, 1), (5, 3), (17, 33), (31, 2)]:
        assert unet(torch.randn(1, 3, h, w)).shape == (1, WIDTH, h, w)


@pytest.mark.parametrize("backbone", ["unet", "dncnn"])
def test_gradients_reach_every_parameter(backbone):
    model = _model(4, backbone=backbone).train()
    x = torch.randn(2, 3, 9, 11)
    target = torch.randn_like(x)
    out = model(x)
    ((out.quantized - target) ** 2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_eval_is_hard_quantization():
    K = 6
    model = _model(K, temperature=2.0).eval()
    x = torch.randn(2, 3, 7, 9) * 3 + 1
    with torch.no_grad():
        out = model(x)
        logits = model.logits(x)
    assert logits.shape == (2, K, 7, 9)
    assert not out.quantized.requires_grad
    torch.testing.assert_close(out.index_map, logits.argmax(1), rtol=0, atol=0)
    torch.testing.assert_close(out.probs, torch.softmax(2.0 * logits, dim=1))
    # quantized is the palette gathered by the index map, so at most K colours per image.
    gathered = torch.stack([out.palette[b][out.index_map[b]].permute(2, 0, 1) for b in range(2)])
    torch.testing.assert_close(out.quantized, gathered, rtol=0, atol=0)
    for b in range(2):
        colours = out.quantized[b].flatten(1).t().unique(dim=0)
        assert len(colours) <= K
        # Each used colour is the mean of its pixels, zeros if unused.
        for k in range(K):
            mask = out.index_map[b] == k
            expected = x[b][:, mask].mean(1) if mask.any() else torch.zeros(3)
            torch.testing.assert_close(out.palette[b, k], expected)
    # Neither colour_norm nor colour_jitter in eval mode: equal to the plain op.
    ref = hard_color_quantize(logits, x)
    torch.testing.assert_close(out.quantized, ref.quantized, rtol=0, atol=0)


def test_color_norm_and_jitter_train_only():
    model = _model(5, temperature=1.5, color_norm=4.0, color_jitter=0.5, eps=1e-6).train()
    x = torch.randn(2, 3, 6, 5)
    torch.manual_seed(123)
    out = model(x)
    again = model(x)  # a fresh jitter on every call
    assert not torch.allclose(out.quantized, again.quantized)

    torch.manual_seed(123)
    jitter = torch.randn(()) * 0.5
    assert jitter.abs() > 1e-3
    soft = soft_color_quantize(model.logits(x), x, 1.5, 1e-6)
    torch.testing.assert_close(out.quantized, soft.quantized / 4.0 + jitter)
    torch.testing.assert_close(out.palette, soft.palette / 4.0 + jitter)
    torch.testing.assert_close(out.probs, soft.probs)
    # Recolouring with the reported palette gives the reported image.
    torch.testing.assert_close(out.quantized, torch.einsum("bkhw,bkc->bchw", out.probs, out.palette))

    # Same seed, same output.
    torch.manual_seed(123)
    torch.testing.assert_close(model(x).quantized, out.quantized, rtol=0, atol=0)

    # Off in eval mode, whatever the seed.
    model.eval()
    with torch.no_grad():
        ref = hard_color_quantize(model.logits(x), x)
        for seed in (1, 2):
            torch.manual_seed(seed)
            ev = model(x)
            torch.testing.assert_close(ev.quantized, ref.quantized, rtol=0, atol=0)
            torch.testing.assert_close(ev.palette, ref.palette, rtol=0, atol=0)


def test_no_tricks_is_the_plain_soft_op():
    model = _model(5, color_norm=1.0, color_jitter=0.0).train()
    x = torch.randn(2, 3, 6, 5)
    state = torch.get_rng_state()
    out = model(x)
    # Without jitter the global RNG is left alone.
    assert torch.equal(state, torch.get_rng_state())
    soft = soft_color_quantize(model.logits(x), x, 1.0, 1e-8)
    torch.testing.assert_close(out.quantized, soft.quantized)
    torch.testing.assert_close(out.palette, soft.palette)


def test_straight_through_value_is_hard_gradient_is_soft():
    """Training-mode forward value: the argmax recolouring (then color_norm and jitter);
    gradient w.r.t. the parameters and the input: that of the soft recolouring."""
    x = torch.randn(2, 3, 6, 5)
    torch.manual_seed(1)
    st = _model(5, temperature=1.5, color_norm=2.0, color_jitter=0.5, straight_through=True).train()
    soft_model = _model(5, temperature=1.5, color_norm=2.0, color_jitter=0.5)
    soft_model.load_state_dict(st.state_dict())
    with torch.no_grad():
        hard = hard_color_quantize(st.logits(x), x)  # train-mode logits (batch statistics)
    torch.manual_seed(7)
    jitter = torch.randn(()) * 0.5

    grads = []
    for model in (st, soft_model):
        model.zero_grad()
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(7)
        out = model(xg)
        if model is st:
            torch.testing.assert_close(out.quantized, hard.quantized / 2.0 + jitter)
            torch.testing.assert_close(out.palette, hard.palette / 2.0 + jitter)
        # A loss linear in the outputs: the same upstream gradients whatever their values.
        w_q = torch.linspace(-1, 1, out.quantized.numel()).view_as(out.quantized)
        w_pal = torch.linspace(2, -1, out.palette.numel()).view_as(out.palette)
        ((out.quantized * w_q).sum() + (out.palette * w_pal).sum()).backward()
        grads.append([xg.grad] + [p.grad for p in model.parameters()])
    assert not torch.allclose(hard.quantized, soft_model(x).quantized)  # the two paths differ in value
    for g_st, g_soft in zip(*grads):
        torch.testing.assert_close(g_st, g_soft)
    assert st.config()["straight_through"] and "straight_through=True" in repr(st)
    with pytest.raises(TypeError, match="straight_through must be a bool"):
        ColorCNN(4, width=WIDTH, straight_through=1)


def test_logit_noise_is_gumbel_noise_on_the_training_logits(tmp_path):
    """Training mode: the soft recolouring of ``logits + s * Gumbel`` (float32 uniforms from the global
    RNG); evaluation mode and the checkpoint's weights are untouched by it."""
    from colorquant_ops.models import load_colorcnn, save_colorcnn

    x = torch.rand(2, 3, 6, 5)
    noisy = _model(4, color_jitter=0.0, logit_noise=0.7).train()
    with torch.no_grad():
        logits = noisy.logits(x)  # train-mode logits (batch statistics)
        torch.manual_seed(3)
        u = torch.rand(logits.shape).clamp_(1e-10, 1 - 1e-7)
        expected = soft_color_quantize(logits - 0.7 * torch.log(-torch.log(u)), x)
        torch.manual_seed(3)
        out = noisy(x)
    torch.testing.assert_close(out.quantized, expected.quantized)
    torch.testing.assert_close(out.probs, expected.probs)
    torch.testing.assert_close(out.palette, expected.palette)
    assert not torch.allclose(out.probs, soft_color_quantize(logits, x).probs)  # the noise is there
    xg = x.clone().requires_grad_(True)
    noisy(xg).quantized.sum().backward()
    assert torch.isfinite(xg.grad).all() and all(torch.isfinite(p.grad).all() for p in noisy.parameters())
    plain = _model(4, color_jitter=0.0)
    plain.load_state_dict(noisy.state_dict())
    noisy.eval(), plain.eval()
    for a, b in zip(noisy(x), plain(x)):
        torch.testing.assert_close(a, b)  # evaluation: the argmax image, no noise
    save_colorcnn(noisy, tmp_path / "noisy.pt")
    assert load_colorcnn(tmp_path / "noisy.pt").logit_noise == 0.7 and "logit_noise=0.7" in repr(noisy)
    ckpt = torch.load(tmp_path / "noisy.pt", weights_only=True)
    del ckpt["config"]["logit_noise"]  # written before the option: none
    torch.save(ckpt, tmp_path / "old.pt")
    assert load_colorcnn(tmp_path / "old.pt").logit_noise == 0.0
    with pytest.raises(ValueError, match="logit_noise must be a finite number >= 0"):
        ColorCNN(4, width=WIDTH, logit_noise=-0.1)


def test_output_in_input_value_space():
    # Normalized or not, the quantized colours are convex combinations of input pixels.
    model = _model(4, color_jitter=0.0)
    x = torch.rand(2, 3, 8, 8) * 200 - 50
    lo = x.amin(dim=(2, 3), keepdim=True) - 1e-3
    hi = x.amax(dim=(2, 3), keepdim=True) + 1e-3
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            q = model(x).quantized
        assert ((q >= lo) & (q <= hi)).all()


@pytest.mark.parametrize("backbone", ["unet", "dncnn"])
def test_channels_last(backbone):
    model = _model(6, backbone=backbone)
    x = torch.randn(2, 3, 9, 7)
    xcl = x.contiguous(memory_format=torch.channels_last)
    model_cl = _model(6, backbone=backbone).to(memory_format=torch.channels_last)
    model_cl.load_state_dict(model.state_dict())
    for train in (True, False):
        model.train(train)
        model_cl.train(train)
        torch.manual_seed(7)
        ref = model(x)
        torch.manual_seed(7)
        out = model_cl(xcl)
        torch.testing.assert_close(out.quantized, ref.quantized, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.probs, ref.probs, rtol=1e-4, atol=1e-4)
    # Backward through a channels_last input.
    model_cl.train()
    xg = xcl.clone().requires_grad_(True)
    model_cl(xg).quantized.sum().backward()
    assert xg.grad.shape == x.shape and torch.isfinite(xg.grad).all()


def test_autocast_bf16_cpu():
    model = _model(8, color_norm=2.0)
    x = torch.randn(2, 3, 11, 13)
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.logits(x)
        out = model(x)
    assert logits.dtype == torch.bfloat16
    # Quantization happens in the image's dtype.
    assert out.quantized.dtype == torch.float32 and out.probs.dtype == torch.float32
    assert torch.isfinite(out.quantized).all() and torch.isfinite(out.palette).all()
    out.quantized.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.quantized.dtype == torch.float32
    assert torch.isfinite(out.quantized).all()
    assert out.index_map.max() < 8


def test_bfloat16_model():
    model = _model(4).to(torch.bfloat16)
    x = torch.randn(1, 3, 5, 6, dtype=torch.bfloat16)
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.quantized.dtype == torch.bfloat16
        assert torch.isfinite(out.quantized.float()).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"num_colors must be in \[2, 256\], got 1"):
        ColorCNN(1, width=WIDTH)
    with pytest.raises(ValueError, match=r"num_colors must be in \[2, 256\], got 257"):
        ColorCNN(257, width=WIDTH)
    with pytest.raises(TypeError, match="num_colors must be an integer"):
        ColorCNN(4.0, width=WIDTH)
    with pytest.raises(TypeError, match="num_colors must be an integer"):
        ColorCNN(True, width=WIDTH)
    with pytest.raises(ValueError, match="backbone must be one of"):
        ColorCNN(4, backbone="resnet", width=WIDTH)
    with pytest.raises(ValueError, match="width must be >= 1"):
        ColorCNN(4, width=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        ColorCNN(4, width=WIDTH, temperature=0.0)
    with pytest.raises(ValueError, match="color_norm must be a finite number > 0"):
        ColorCNN(4, width=WIDTH, color_norm=float("inf"))
    with pytest.raises(ValueError, match="color_jitter must be a finite number >= 0"):
        ColorCNN(4, width=WIDTH, color_jitter=-1.0)

    model = _model(4)
    with pytest.raises(ValueError, match=r"must be 4-D \[B, C, H, W\], got shape \(3, 8, 8\)"):
        model(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"must have in_channels=3 channels, got shape \(1, 4, 8, 8\)"):
        model(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="in_channels=3"):
        model.logits(torch.randn(1, 1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        model(torch.randn(1, 3, 0, 8))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        model([[1.0]])


def test_grayscale_input():
    model = _model(3, in_channels=1)
    x = torch.randn(2, 1, 5, 5)
    _check_train(model, x, 3)
    _check_eval(model, x, 3)


# --- input normalization, checkpoints, export -----------------------------------------------

NORM = ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))


def test_input_normalization_eval_sees_normalized_recolours_input():
    plain = _model(4, color_jitter=0.0).eval()
    normalizing = _model(4, color_jitter=0.0, input_normalization=NORM).eval()
    normalizing.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 9, 7, dtype=torch.float64)
    plain, normalizing = plain.double(), normalizing.double()
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in NORM)
    out = normalizing(x)
    logits = plain.logits((x - mean) / std)
    expected = hard_color_quantize(logits, x)  # palette: the mean of the input pixels
    assert torch.equal(out.index_map, expected.index_map)
    torch.testing.assert_close(out.palette, expected.palette, rtol=0, atol=1e-12)
    # the same as the plain network on the normalized image, mapped back
    legacy = plain(((x - mean) / std))
    torch.testing.assert_close(out.quantized, legacy.quantized * std + mean, rtol=0, atol=1e-12)


def test_input_normalization_training_tricks_act_in_the_normalized_space():
    plain = _model(2, color_norm=4.0, color_jitter=1.0).double().train()
    normalizing = _model(2, color_norm=4.0, color_jitter=1.0, input_normalization=NORM).double().train()
    normalizing.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in NORM)
    torch.manual_seed(5)
    legacy = plain((x - mean) / std)
    torch.manual_seed(5)
    out = normalizing(x)
    # equal but for the soft palette's eps (sum p x / (sum p + eps) is not shift-equivariant: ~mean * eps / S)
    torch.testing.assert_close(out.quantized, legacy.quantized * std + mean, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.palette, legacy.palette * std.view(1, 1, 3) + mean.view(1, 1, 3), rtol=0,
                               atol=1e-9)
    torch.testing.assert_close(out.probs, legacy.probs, rtol=0, atol=1e-12)


def test_input_normalization_in_checkpoints(tmp_path):
    from colorquant_ops.models import load_colorcnn, save_colorcnn

    model = _model(2)
    save_colorcnn(model, tmp_path / "plain.pt")
    assert load_colorcnn(tmp_path / "plain.pt").input_normalization is None
    save_colorcnn(model, tmp_path / "trained.pt", input_normalization=NORM, dataset="cifar10")
    assert load_colorcnn(tmp_path / "trained.pt").input_normalization == NORM
    # written before ColorCNN recorded it: the dataset the checkpoint names decides
    ckpt = torch.load(tmp_path / "plain.pt", weights_only=True)
    del ckpt["config"]["input_normalization"]
    torch.save({**ckpt, "dataset": "cifar10"}, tmp_path / "old.pt")
    assert load_colorcnn(tmp_path / "old.pt").input_normalization == NORM
    assert "input_normalization" in repr(_model(2, input_normalization=NORM))


@pytest.mark.parametrize("value, error, match", [
    ((0.5, 0.5), TypeError, "input_normalization must be None or \\(mean, std\\)"),
    (((0.5,) * 2, (0.5,) * 2), ValueError, "needs 3 means and stds"),
    (((0.5,) * 3, (0.0,) * 3), ValueError, "stds finite and > 0"),
    (((float("nan"),) * 3, (1.0,) * 3), ValueError, "means must be finite"),
])
def test_bad_input_normalization(value, error, match):
    with pytest.raises(error, match=match):
        _model(2, input_normalization=value)


def test_export_save_load_round_trip(tmp_path):
    model = _model(2, input_normalization=NORM).eval()
    x = torch.rand(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    torch.export.save(program, tmp_path / "colorcnn.pt2")
    loaded = torch.export.load(tmp_path / "colorcnn.pt2").module()
    out, expected = loaded(x), model(x)
    assert isinstance(out, ColorCNNOutput)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
