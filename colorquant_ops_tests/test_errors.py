"""Bad input gets the right Python exception type and a message naming the
problem, from the public wrappers and from direct torch.ops.colorquant calls
(the checks live in the kernels, csrc/common/checks.h), on every device."""

import math

import pytest
import torch

import colorquant_ops.ops as cq

from .conftest import DEVICES
from .helpers import CUDA_SKIP_REASON

OPS = torch.ops.colorquant


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.ones(shape, dtype=dtype, device=device)


# Every case also runs on meta tensors: the fake implementations (what torch.compile traces)
# must reject a bad call exactly as the kernels do (colorquant_ops/ops/fake_checks.py).
@pytest.fixture(params=[*DEVICES, pytest.param("meta", id="meta")], scope="module")
def device(request):
    return request.param


# Both ops that take (logits, image): the public wrapper and the raw op.
LOGITS_IMAGE_OPS = {
    "soft": cq.soft_color_quantize,
    "soft-raw": lambda lg, im: OPS.soft_color_quantize(lg, im, 1.0, 1e-8),
    "hard": cq.hard_color_quantize,
    "hard-raw": OPS.hard_color_quantize,
}
RENDER_OPS = {"render": cq.render_index_map, "render-raw": OPS.render_index_map}


@pytest.fixture(params=list(LOGITS_IMAGE_OPS), ids=list(LOGITS_IMAGE_OPS))
def logits_image_op(request):
    return LOGITS_IMAGE_OPS[request.param]


@pytest.fixture(params=list(RENDER_OPS), ids=list(RENDER_OPS))
def render_op(request):
    return RENDER_OPS[request.param]


# --------------------------------------------------------------------------- (logits, image)


@pytest.mark.parametrize(
    "logits_shape,image_shape",
    [((2, 4, 5, 6), (3, 3, 5, 6)), ((2, 4, 5, 6), (2, 3, 4, 6)), ((2, 4, 5, 6), (2, 3, 5, 7)), ((0, 4, 5, 6), (1, 3, 5, 6))],
    ids=["B", "H", "W", "B0"],
)
def test_mismatched_shapes(device, logits_image_op, logits_shape, image_shape):
    with pytest.raises(ValueError, match=r"must agree in B, H and W"):
        logits_image_op(t(*logits_shape, device=device), t(*image_shape, device=device))


@pytest.mark.parametrize(
    "logits_shape,image_shape,name",
    [
        ((4, 5, 6), (1, 3, 5, 6), "logits"),
        ((1, 1, 4, 5, 6), (1, 3, 5, 6), "logits"),
        ((1, 4, 5, 6), (3, 5, 6), "image"),
        ((1, 4, 5, 6), (1, 3, 5, 6, 1), "image"),
    ],
)
def test_wrong_ndim(device, logits_image_op, logits_shape, image_shape, name):
    with pytest.raises(ValueError, match=rf"{name} must be 4-D"):
        logits_image_op(t(*logits_shape, device=device), t(*image_shape, device=device))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("name", ["logits", "image"])
def test_non_floating_input(device, logits_image_op, dtype, name):
    lg = t(1, 4, 3, 3, dtype=dtype if name == "logits" else torch.float32, device=device)
    im = t(1, 3, 3, 3, dtype=dtype if name == "image" else torch.float32, device=device)
    with pytest.raises(TypeError, match=rf"{name} must be a floating-point tensor"):
        logits_image_op(lg, im)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float16, torch.bfloat16), (torch.float64, torch.float16)])
def test_mixed_dtypes(device, logits_image_op, dtypes):
    with pytest.raises(TypeError, match=r"logits and image must have the same dtype"):
        logits_image_op(t(1, 4, 3, 3, dtype=dtypes[0], device=device), t(1, 3, 3, 3, dtype=dtypes[1], device=device))


@pytest.mark.parametrize("K", [0, 257, 1000])
def test_number_of_colours(device, logits_image_op, K):
    with pytest.raises(ValueError, match=rf"number of colours K .* must be in \[1, 256\], got {K}"):
        logits_image_op(t(1, K, 3, 3, device=device), t(1, 3, 3, 3, device=device))


def test_no_channels(device, logits_image_op):
    with pytest.raises(ValueError, match=r"image must have at least one channel"):
        logits_image_op(t(1, 4, 3, 3, device=device), t(1, 0, 3, 3, device=device))


@pytest.mark.parametrize("op", [cq.soft_color_quantize, cq.hard_color_quantize], ids=["soft", "hard"])
@pytest.mark.parametrize("name", ["logits", "image"])
@pytest.mark.parametrize("value", [[[1.0]], 1.0, None, "x"], ids=["list", "float", "None", "str"])
def test_non_tensor_inputs(op, name, value):
    args = {"logits": t(1, 2, 1, 1), "image": t(1, 1, 1, 1)}
    args[name] = value
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor, got {type(value).__name__}"):
        op(**args)


@pytest.mark.parametrize("name", ["temperature", "eps"])
@pytest.mark.parametrize("value", ["1", None, True, t(1)], ids=["str", "None", "bool", "tensor"])
def test_non_number_scalars(name, value):
    with pytest.raises(TypeError, match=rf"{name} must be a Python number"):
        cq.soft_color_quantize(t(1, 2, 1, 1), t(1, 1, 1, 1), **{name: value})


SOFT_CALLS = {
    "wrapper": lambda lg, im, temperature, eps: cq.soft_color_quantize(lg, im, temperature, eps),
    "raw": lambda lg, im, temperature, eps: OPS.soft_color_quantize(lg, im, temperature, eps),
}


@pytest.mark.parametrize("call", list(SOFT_CALLS))
@pytest.mark.parametrize("temperature", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_bad_temperature(device, call, temperature):
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0"):
        SOFT_CALLS[call](t(1, 2, 3, 3, device=device), t(1, 3, 3, 3, device=device), temperature, 1e-8)


@pytest.mark.parametrize("call", list(SOFT_CALLS))
@pytest.mark.parametrize("eps", [-1e-12, -1.0, math.nan, math.inf])
def test_bad_eps(device, call, eps):
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        SOFT_CALLS[call](t(1, 2, 3, 3, device=device), t(1, 3, 3, 3, device=device), 1.0, eps)


def test_bad_upstream_gradient_shape(device):
    """The backward op checks the gradients' shapes (a direct torch.ops call)."""
    lg, im = t(2, 4, 3, 5, device=device), t(2, 3, 3, 5, device=device)
    q, pal, probs = OPS.soft_color_quantize(lg, im, 1.0, 1e-8)
    good = (torch.ones_like(q), torch.ones_like(pal), torch.ones_like(probs))
    for i, name in enumerate(["grad_quantized", "grad_palette", "grad_probs"]):
        grads = list(good)
        grads[i] = torch.ones(1, *grads[i].shape[1:], device=device)
        with pytest.raises(ValueError, match=rf"{name} must have shape"):
            OPS.soft_color_quantize_backward(*grads, probs, im, pal, 1.0, 1e-8)


# --------------------------------------------------------------------------- (index_map, palette)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8, torch.float32])
def test_index_map_not_int64(device, render_op, dtype):
    with pytest.raises(TypeError, match=r"index_map must be an int64"):
        render_op(torch.zeros(1, 3, 3, dtype=dtype, device=device), t(1, 4, 3, device=device))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_palette_not_floating(device, render_op, dtype):
    with pytest.raises(TypeError, match=r"palette must be a floating-point tensor"):
        render_op(torch.zeros(1, 3, 3, dtype=torch.long, device=device), t(1, 4, 3, dtype=dtype, device=device))


@pytest.mark.parametrize(
    "index_shape,palette_shape,match",
    [
        ((3, 3), (1, 4, 3), r"index_map must be 3-D"),
        ((1, 1, 3, 3), (1, 4, 3), r"index_map must be 3-D"),
        ((1, 3, 3), (4, 3), r"palette must be 3-D"),
        ((1, 3, 3), (1, 4, 3, 1), r"palette must be 3-D"),
        ((2, 3, 3), (1, 4, 3), r"must agree in B"),
        ((1, 3, 3), (1, 0, 3), r"number of colours K .* got 0"),
        ((1, 3, 3), (1, 257, 3), r"number of colours K .* got 257"),
        ((1, 3, 3), (1, 4, 0), r"palette must have at least one channel"),
    ],
    ids=["index-2d", "index-4d", "palette-2d", "palette-4d", "B", "K0", "K257", "C0"],
)
def test_render_bad_shapes(device, render_op, index_shape, palette_shape, match):
    with pytest.raises(ValueError, match=match):
        render_op(torch.zeros(index_shape, dtype=torch.long, device=device), t(*palette_shape, device=device))


@pytest.mark.parametrize("bad", [-1, 4, 99])
def test_index_outside_palette(device, render_op, bad):
    if device == "meta":
        pytest.skip("the index range needs the values: checked by the kernels only")
    index_map = torch.zeros(2, 3, 3, dtype=torch.long, device=device)
    index_map[1, 2, 1] = bad
    with pytest.raises(IndexError, match=rf"{bad}.*\[0, 4\)"):
        render_op(index_map, t(2, 4, 3, device=device))


@pytest.mark.parametrize("name", ["index_map", "palette"])
@pytest.mark.parametrize("value", [[[0]], 0, None], ids=["list", "int", "None"])
def test_render_non_tensor_inputs(name, value):
    args = {"index_map": torch.zeros(1, 1, 1, dtype=torch.long), "palette": t(1, 1, 1)}
    args[name] = value
    with pytest.raises(TypeError, match=rf"{name} must be a torch.Tensor"):
        cq.render_index_map(**args)


# --------------------------------------------------------------------------- devices


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("first", ["cpu", "cuda"])
def test_different_devices(logits_image_op, render_op, first):
    second = "cuda" if first == "cpu" else "cpu"
    with pytest.raises(ValueError, match=r"logits and image must be on the same device"):
        logits_image_op(t(1, 4, 3, 3, device=first), t(1, 3, 3, 3, device=second))
    with pytest.raises(ValueError, match=r"index_map and palette must be on the same device"):
        render_op(torch.zeros(1, 3, 3, dtype=torch.long, device=first), t(1, 4, 3, device=second))


# --------------------------------------------------------------------------- float8


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_float8_is_a_type_error_naming_the_argument(device, dtype):
    f8 = lambda *shape: torch.zeros(shape, device=device).to(dtype)  # noqa: E731
    match = r"must be a floating-point tensor \(float32, float16, bfloat16 or float64\), got Float8"
    with pytest.raises(TypeError, match="logits " + match):
        cq.soft_color_quantize(f8(1, 2, 4, 4), f8(1, 3, 4, 4))
    with pytest.raises(TypeError, match="logits " + match):
        cq.hard_color_quantize(f8(1, 2, 4, 4), f8(1, 3, 4, 4))
    with pytest.raises(TypeError, match="palette " + match):
        cq.render_index_map(torch.zeros(1, 4, 4, dtype=torch.long, device=device), f8(1, 2, 3))
    with pytest.raises(TypeError, match="image " + match):
        cq.kmeans_palette(f8(1, 3, 4, 4), 2)
    with pytest.raises(TypeError, match="image " + match):
        cq.floyd_steinberg_dither(f8(1, 3, 4, 4), f8(1, 2, 3))
    with pytest.raises(TypeError, match="image " + match):
        cq.palette_distance(f8(1, 3, 4, 4), f8(1, 2, 3))


# --------------------------------------------------------------------------- meta == kernels

_BAD_CALLS = {
    "soft-K": lambda d: OPS.soft_color_quantize(t(1, 300, 2, 2, device=d), t(1, 3, 2, 2, device=d), 1.0, 1e-8),
    "soft-shape": lambda d: OPS.soft_color_quantize(t(1, 2, 2, 2, device=d), t(2, 3, 2, 2, device=d), 1.0, 1e-8),
    "soft-dtype": lambda d: OPS.soft_color_quantize(t(1, 2, 2, 2, device=d),
                                                    t(1, 3, 2, 2, dtype=torch.float64, device=d), 1.0, 1e-8),
    "soft-temperature": lambda d: OPS.soft_color_quantize(t(1, 2, 2, 2, device=d), t(1, 3, 2, 2, device=d),
                                                          -1.0, 1e-8),
    "soft-backward": lambda d: OPS.soft_color_quantize_backward(
        t(1, 3, 2, 2, device=d), None, None, t(1, 2, 2, 2, device=d), t(1, 3, 2, 2, device=d),
        t(1, 3, 3, device=d), 1.0, 1e-8),
    "hard-ndim": lambda d: OPS.hard_color_quantize(t(2, 2, 2, device=d), t(1, 3, 2, 2, device=d)),
    "hard-int": lambda d: OPS.hard_color_quantize(t(1, 2, 2, 2, dtype=torch.int64, device=d),
                                                  t(1, 3, 2, 2, device=d)),
    "render-B": lambda d: OPS.render_index_map(torch.zeros(2, 3, 3, dtype=torch.long, device=d),
                                               t(1, 4, 3, device=d), True),
    "render-backward": lambda d: OPS.render_index_map_backward(
        t(1, 2, 3, 3, device=d), torch.zeros(1, 3, 3, dtype=torch.long, device=d), t(1, 4, 3, device=d), True),
    "kmeans-K": lambda d: OPS.kmeans_palette(t(1, 3, 4, 4, device=d), 0, 10, 0),
    "kmeans-iters": lambda d: OPS.kmeans_palette(t(1, 3, 4, 4, device=d), 2, -1, 0),
    "kmeans-uint8": lambda d: OPS.kmeans_palette(t(1, 3, 4, 4, dtype=torch.uint8, device=d), 2, 10, 0),
    "dither-C": lambda d: OPS.floyd_steinberg_dither(t(1, 3, 4, 4, device=d), t(1, 2, 4, device=d), None, None),
    "dither-clamp": lambda d: OPS.floyd_steinberg_dither(t(1, 3, 4, 4, device=d), t(1, 2, 3, device=d), 1.0, 0.0),
    "distance-C": lambda d: OPS.palette_distance(t(1, 3, 4, 4, device=d), t(1, 2, 4, device=d)),
    "distance-dtype": lambda d: OPS.palette_distance(t(1, 3, 4, 4, device=d), t(1, 2, 3, dtype=torch.float16, device=d)),
    "distance-backward": lambda d: OPS.palette_distance_backward(t(1, 2, 4, 3, device=d), t(1, 3, 4, 4, device=d),
                                                                 t(1, 2, 3, device=d)),
    "dither-float8": lambda d: OPS.floyd_steinberg_dither(t(1, 3, 4, 4, device=d).to(torch.float8_e5m2),
                                                          t(1, 2, 3, device=d), None, None),
}


def _failure(call, device):
    with pytest.raises((TypeError, ValueError, IndexError)) as info:
        call(device)
    return type(info.value), str(info.value).split("\n")[0]


@pytest.mark.parametrize("case", list(_BAD_CALLS))
def test_meta_fails_like_the_kernels(case):
    kind, message = _failure(_BAD_CALLS[case], "cpu")
    assert _failure(_BAD_CALLS[case], "meta") == (kind, message.replace("cpu", "meta"))


def test_meta_mixed_with_cpu_is_a_device_error():
    # before: CPU tensors of uninitialized memory came back
    with pytest.raises(ValueError, match="logits and image must be on the same device, got meta and cpu"):
        OPS.hard_color_quantize(t(1, 2, 2, 2, device="meta"), t(1, 3, 2, 2))
    with pytest.raises(ValueError, match="image and palette must be on the same device, got cpu and meta"):
        OPS.floyd_steinberg_dither(t(1, 3, 4, 4), t(1, 2, 3, device="meta"), None, None)
