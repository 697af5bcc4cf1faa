"""CUDA-only behaviour of the ops that the per-op tests (their ``device``
fixture's cuda variants) do not cover: a second GPU (device guard), a
non-default stream, CUDA-graph capture of a ColorCNN training step and of the
hard path, batches above gridDim.y's 65535, palettes that take the
global-memory fallbacks, channel counts above the register chunk, and no
host sync on the training path.

Without a GPU every CUDA test here is skipped with a visible reason; the few
CPU tests check the helpers and the design decisions that the GPU tests rely
on (which index maps render_index_map trusts, NaN-aware bit comparison).
"""

import pytest
import torch

import colorquant_ops.ops as cq
from colorquant_ops.models import ColorCNN
from colorquant_ops.ops import color_quantize as cq_module
from colorquant_ops.ops import reference

from .helpers import (
    CUDA_SKIP_REASON,
    assert_same_bits_or_both_nan,
    check_render_backward,
    check_soft_backward,
    check_soft_forward,
    f64,
    generator,
    mean_tol,
    rand,
    randn,
    random_index_map,
)

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON)
needs_two_gpus = pytest.mark.skipif(
    not HAS_CUDA or torch.cuda.device_count() < 2,
    reason=CUDA_SKIP_REASON if not HAS_CUDA else "needs two GPUs (device guard test), found one",
)


def all_ops(device, B=2, C=3, H=9, W=11, K=5, seed=0, dtype=torch.float32):
    """Every op once on `device`; returns a dict name -> output tensor(s), all on the CPU."""
    gen = generator(seed)
    logits = randn((B, K, H, W), gen, 2.0, dtype, device).requires_grad_(True)
    image = rand((B, C, H, W), gen, dtype=dtype, device=device).requires_grad_(True)
    soft = cq.soft_color_quantize(logits, image, 0.7, 1e-6)
    grads = torch.autograd.grad(soft.quantized.square().sum() + soft.palette.sum(), (logits, image))
    hard = cq.hard_color_quantize(logits, image)
    palette = randn((B, K, C), gen, 1.0, dtype, device).requires_grad_(True)
    rendered = cq.render_index_map(hard.index_map, palette)
    (grad_palette,) = torch.autograd.grad(rendered.square().sum(), palette)
    km = cq.kmeans_palette(image.detach(), K, 4, seed=3)
    dither = cq.floyd_steinberg_dither(image.detach(), km.palette)
    distance = cq.palette_distance(image, palette)
    distance_grads = torch.autograd.grad((distance * logits.detach()).sum(), (image, palette))
    out = {
        "soft": soft, "soft_grads": grads, "hard": hard, "render": rendered, "render_grad": grad_palette,
        "kmeans": km, "dither": dither, "distance": distance, "distance_grads": distance_grads,
    }
    return {name: tuple(t.detach().cpu() for t in v) if isinstance(v, tuple) else v.detach().cpu()
            for name, v in out.items()}


def assert_same_results(a, b):
    for name in a:
        xs = a[name] if isinstance(a[name], tuple) else (a[name],)
        ys = b[name] if isinstance(b[name], tuple) else (b[name],)
        for x, y in zip(xs, ys):
            assert_same_bits_or_both_nan(x, y, what=name)


# --------------------------------------------------------------------------- devices and streams


@needs_two_gpus
def test_second_gpu():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (device
    guard), the outputs live there, and they equal cuda:0's bit for bit."""
    torch.cuda.set_device(0)
    on0 = all_ops("cuda:0")
    with torch.cuda.device(0):
        gen = generator(0)
        x = rand((2, 3, 9, 11), gen, device="cuda:1")
        out = cq.kmeans_palette(x, 5, 2)
        assert out.palette.device == torch.device("cuda:1")
        assert out.index_map.device == torch.device("cuda:1")
        on1 = all_ops("cuda:1")
    assert_same_results(on0, on1)


@needs_cuda
def test_non_default_stream():
    """The kernels run on the current stream (not the legacy default one): the
    results on a side stream equal the default stream's."""
    want = all_ops("cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = all_ops("cuda")
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert_same_results(want, got)


# --------------------------------------------------------------------------- CUDA graphs


def _colorcnn_step(model, x, opt_free=True):
    out = model(x)
    loss = (out.quantized - x).square().mean() + 0.1 * out.probs.amax(dim=1).mean()
    loss.backward()
    return loss


@needs_cuda
def test_cuda_graph_colorcnn_training_step():
    """A ColorCNN training step (soft forward + backward) captured in a CUDA graph
    and replayed gives the eager step's loss and gradients."""
    torch.manual_seed(0)
    model = ColorCNN(8, width=8, color_jitter=0.0).cuda().train()
    x_eager = torch.rand(4, 3, 16, 16, device="cuda")
    static_x = torch.empty_like(x_eager)
    # Warm-up on a side stream, as torch.cuda.graph requires.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model.zero_grad(set_to_none=False)
            static_x.copy_(x_eager)
            _colorcnn_step(model, static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    model.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_loss = _colorcnn_step(model, static_x)
    # Batch-norm running statistics move at each step; compare gradients of
    # one replay with one eager step from the same state.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    static_x.copy_(x_eager)
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    replay_grads = [p.grad.clone() for p in model.parameters()]
    replay_loss = static_loss.clone()
    model.load_state_dict(state)
    for p in model.parameters():
        p.grad = None
    eager_loss = _colorcnn_step(model, x_eager)
    torch.testing.assert_close(replay_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, p in zip(replay_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in replay_grads)


@needs_cuda
def test_cuda_graph_hard_path():
    """hard_color_quantize, render_index_map (default check: skipped under
    capture, no sync) and its backward captured and replayed on new inputs."""
    gen = generator(1)
    B, K, C, H, W = 3, 7, 3, 13, 17
    static_logits = randn((B, K, H, W), gen, device="cuda")
    static_image = rand((B, C, H, W), gen, device="cuda")
    static_palette = randn((B, K, C), gen, device="cuda").requires_grad_(True)
    user_map = random_index_map((B, H, W), K, gen, "cuda")  # not library-made: checked in eager use

    def step():
        hard = cq.hard_color_quantize(static_logits, static_image)
        rendered = cq.render_index_map(user_map, static_palette)
        (grad,) = torch.autograd.grad(rendered.square().sum(), static_palette)
        return hard, rendered, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    new_logits = randn((B, K, H, W), gen, device="cuda")
    new_map = random_index_map((B, H, W), K, gen, "cuda")
    static_logits.copy_(new_logits)
    user_map.copy_(new_map)
    graph.replay()
    torch.cuda.synchronize()
    want_hard = cq.hard_color_quantize(new_logits, static_image)
    assert torch.equal(static_out[0].index_map, want_hard.index_map)
    assert torch.equal(static_out[0].palette, want_hard.palette)
    assert torch.equal(static_out[0].quantized, want_hard.quantized)
    assert torch.equal(static_out[1], reference.render_index_map(new_map, static_palette.detach()))
    check_render_backward(static_out[2], new_map, static_palette.detach(), 2 * static_out[1])


# --------------------------------------------------------------------------- sizes


@needs_cuda
def test_batch_above_grid_y_limit():
    """B = 65537 > 65535 (gridDim.y): every image is processed, as on the CPU."""
    B, K, C, H, W = 65537, 3, 2, 2, 3
    gen = generator(2)
    logits = randn((B, K, H, W), gen)
    image = rand((B, C, H, W), gen)
    cpu = {"hard": cq.hard_color_quantize(logits, image), "kmeans": cq.kmeans_palette(image, K, 2, seed=1)}
    cuda = {"hard": cq.hard_color_quantize(logits.cuda(), image.cuda()),
            "kmeans": cq.kmeans_palette(image.cuda(), K, 2, seed=1)}
    assert torch.equal(cuda["hard"].index_map.cpu(), cpu["hard"].index_map)
    tol = mean_tol(torch.float32, xmax=1.0, num_pixels=H * W)
    torch.testing.assert_close(cuda["hard"].palette.cpu(), cpu["hard"].palette, **tol.kw())
    assert torch.equal(cuda["kmeans"].index_map.cpu(), cpu["kmeans"].index_map)
    assert torch.equal(cuda["kmeans"].palette.cpu(), cpu["kmeans"].palette)
    dither = cq.floyd_steinberg_dither(image.cuda(), cpu["kmeans"].palette.cuda())
    assert torch.equal(dither.cpu(), cq.floyd_steinberg_dither(image, cpu["kmeans"].palette))
    soft = cq.soft_color_quantize(logits.cuda(), image.cuda(), 1.0, 1e-6)
    check_soft_forward(soft, logits, image, 1.0, 1e-6)
    palette = randn((B, K, C), gen)
    grad = randn((B, C, H, W), gen)
    got = torch.ops.colorquant.render_index_map_backward(grad.cuda(), cpu["hard"].index_map.cuda(), palette.cuda())
    check_render_backward(got, cpu["hard"].index_map, palette, grad)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_palettes_in_global_memory(dtype):
    """K * C opmath values above 48 KiB: k-means centres and the dither palette
    are read from global memory instead of shared memory; results still equal
    the CPU's bit for bit."""
    B, C, H, W, K = 2, 64, 24, 40, 256
    gen = generator(3)
    image = rand((B, C, H, W), gen, dtype=dtype)
    want = cq.kmeans_palette(image, K, 2, seed=5)
    got = cq.kmeans_palette(image.cuda(), K, 2, seed=5)
    assert torch.equal(got.index_map.cpu(), want.index_map)
    assert torch.equal(got.palette.cpu(), want.palette)
    assert torch.equal(cq.floyd_steinberg_dither(image.cuda(), want.palette.cuda()).cpu(),
                       cq.floyd_steinberg_dither(image, want.palette))


@needs_cuda
@pytest.mark.parametrize("C", [5, 7, 9])
def test_channels_above_register_chunk(C):
    """C above the kernels' register chunk (4 channels) and outside the dither's
    specializations (1, 3, 4): every op against the float64 oracle / the CPU."""
    B, K, H, W = 2, 6, 33, 35  # 1155 pixels: two tiles of the partial sums
    gen = generator(C)
    logits = randn((B, K, H, W), gen, 2.0)
    image = rand((B, C, H, W), gen)
    lg, im = logits.cuda().requires_grad_(True), image.cuda().requires_grad_(True)
    out = cq.soft_color_quantize(lg, im, 1.0, 1e-6)
    check_soft_forward(out, logits, image, 1.0, 1e-6)
    grads = tuple(randn(o.shape, gen, device="cuda") for o in out)
    got_l, got_x = torch.autograd.grad(out, (lg, im), grads)
    check_soft_backward(got_l, got_x, logits, image, 1.0, 1e-6, grads)
    hard = cq.hard_color_quantize(logits.cuda(), image.cuda())
    want = reference.hard_color_quantize(f64(logits), f64(image))
    assert torch.equal(hard.index_map.cpu(), want[1])
    tol = mean_tol(torch.float32, xmax=1.0, num_pixels=H * W)
    torch.testing.assert_close(f64(hard.palette), want[2], **tol.kw())
    km_cpu = cq.kmeans_palette(image, K, 3, seed=0)
    km = cq.kmeans_palette(image.cuda(), K, 3, seed=0)
    assert torch.equal(km.index_map.cpu(), km_cpu.index_map)
    assert torch.equal(km.palette.cpu(), km_cpu.palette)
    assert torch.equal(cq.floyd_steinberg_dither(image.cuda(), km.palette).cpu(),
                       cq.floyd_steinberg_dither(image, km_cpu.palette))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_palette_counts_underflowing_probabilities(dtype):
    """Defect 1 of issue 17: logits [0, -20], one pixel 0.25, eps 1e-8: the palette
    entry of colour 1 is 0.0427 (float64 oracle and CPU), also where its
    probability underflows to 0 in float16."""
    logits = torch.tensor([0.0, -20.0], dtype=dtype).reshape(1, 2, 1, 1)
    image = torch.full((1, 1, 1, 1), 0.25, dtype=dtype)
    out = cq.soft_color_quantize(logits.cuda(), image.cuda(), 1.0, 1e-8)
    check_soft_forward(out, logits, image, 1.0, 1e-8)
    assert abs(float(out.palette[0, 1, 0]) - 0.0427) < 1e-3


# --------------------------------------------------------------------------- no host sync


@needs_cuda
def test_training_path_does_not_sync():
    """Soft forward + backward, the hard path and the rendering of library-made
    index maps (hard, k-means, dither; with its backward) run without a device-to-host sync; an explicit
    check_indices=True does sync (so the mode does catch the check)."""
    gen = generator(4)
    B, K, C, H, W = 4, 8, 3, 32, 32
    logits = randn((B, K, H, W), gen, device="cuda").requires_grad_(True)
    image = rand((B, C, H, W), gen, device="cuda").requires_grad_(True)
    palette = randn((B, K, C), gen, device="cuda").requires_grad_(True)
    # k-means and dithering are not on the training path: their finite-pixel check waits for the GPU
    km = cq.kmeans_palette(image.detach(), K, 2)
    dithered = cq.floyd_steinberg_dither(image.detach(), km.palette)
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = cq.soft_color_quantize(logits, image)
        loss = out.quantized.square().sum() + out.palette.sum()
        gl, gx = torch.autograd.grad(loss, (logits, image))
        hard = cq.hard_color_quantize(logits, image)
        rendered = cq.render_index_map(hard.index_map, palette)
        (gp,) = torch.autograd.grad(rendered.sum(), palette)
        rendered_km = cq.render_index_map(km.index_map, km.palette)
        rendered_d = cq.render_index_map(dithered, km.palette)
        with pytest.raises(RuntimeError, match="synchroniz"):
            cq.render_index_map(hard.index_map, palette, check_indices=True)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    for t in (gl, gx, gp, rendered, rendered_km, rendered_d):
        assert torch.isfinite(t).all()


@needs_cuda
def test_unchecked_out_of_range_index_renders_zeros():
    """check_indices=False on CUDA: no IndexError; the bad index renders zeros and
    gives no gradient (never an out-of-bounds read)."""
    palette = torch.arange(1.0, 13.0, device="cuda").reshape(1, 4, 3).requires_grad_(True)
    index_map = torch.tensor([[[0, 4], [-1, 3]]], device="cuda")
    out = cq.render_index_map(index_map, palette, check_indices=False)
    want = torch.tensor([[[1.0, 0.0], [0.0, 10.0]], [[2.0, 0.0], [0.0, 11.0]], [[3.0, 0.0], [0.0, 12.0]]])
    assert torch.equal(out.detach().cpu(), want[None])
    (grad,) = torch.autograd.grad(out.sum(), palette)
    assert torch.equal(grad.cpu(), torch.tensor([[[1.0] * 3, [0.0] * 3, [0.0] * 3, [1.0] * 3]]))
    with pytest.raises(IndexError, match="outside the palette's range"):
        cq.render_index_map(index_map, palette)


# --------------------------------------------------------------------------- CPU-side checks of the design


def test_library_index_maps_skip_the_check(monkeypatch):
    """Index maps returned by hard_color_quantize / kmeans_palette /
    floyd_steinberg_dither are rendered with check_indices=False (no sync on
    CUDA) until modified in place; other maps, and too small palettes, are
    checked; the backward never re-checks."""
    calls = []

    class Recorder:
        def __getattr__(self, name):
            op = getattr(torch.ops.colorquant, name)

            def call(*args):
                calls.append((name, args[-1] if isinstance(args[-1], bool) else None))
                return op(*args)

            return call

    monkeypatch.setattr(cq_module, "_ops", Recorder())
    gen = generator(5)
    logits, image = randn((2, 6, 5, 7), gen), rand((2, 3, 5, 7), gen)
    hard = cq.hard_color_quantize(logits, image)
    palette = randn((2, 6, 3), gen).requires_grad_(True)
    out = cq.render_index_map(hard.index_map, palette)
    out.sum().backward()
    assert int(hard.index_map.max()) == 5
    with pytest.raises(IndexError):  # fewer colours than it was made for: checked, and wrong
        cq.render_index_map(hard.index_map, palette[:, :5].contiguous())
    user_map = hard.index_map.clone()
    cq.render_index_map(user_map, palette)
    hard.index_map[0, 0, 0] = 5  # in place: no longer known valid
    cq.render_index_map(hard.index_map, palette)
    km = cq.kmeans_palette(image, 4, 2)
    cq.render_index_map(km.index_map, km.palette)
    cq.render_index_map(cq.floyd_steinberg_dither(image, km.palette), km.palette)
    renders = [c for c in calls if c[0].startswith("render")]
    assert renders == [
        ("render_index_map", False),
        ("render_index_map_backward", False),
        ("render_index_map", True),
        ("render_index_map", True),
        ("render_index_map", True),
        ("render_index_map", False),
        ("render_index_map", False),
    ]


def test_cpu_checks_indices_even_when_told_not_to():
    palette = torch.zeros(1, 4, 3)
    with pytest.raises(IndexError, match="outside the palette's range"):
        cq.render_index_map(torch.tensor([[[0, 4]]]), palette, check_indices=False)
    with pytest.raises(IndexError, match="outside the palette's range"):
        torch.ops.colorquant.render_index_map_backward(torch.ones(1, 3, 1, 2), torch.tensor([[[0, 4]]]),
                                                       palette, False)


def test_nan_aware_bit_comparison():
    """NaN payloads are not part of the bit-identity claims (bfloat16 NaN is
    0x7FC0 from the CPU's conversion, 0x7FFF from CUDA's): the comparison used
    between devices accepts any NaN for a NaN, and nothing else."""
    a = torch.tensor([0x7FC0, 0x3F80, 0x0000], dtype=torch.int16).view(torch.bfloat16)
    b = torch.tensor([0x7FFF, 0x3F80, 0x0000], dtype=torch.int16).view(torch.bfloat16)
    assert_same_bits_or_both_nan(a, b)
    c = torch.tensor([0x7FC0, 0x3F80, -32768], dtype=torch.int16).view(torch.bfloat16)  # -0.0
    with pytest.raises(AssertionError, match="bits differ"):
        assert_same_bits_or_both_nan(a, c)
    with pytest.raises(AssertionError, match="NaN"):
        assert_same_bits_or_both_nan(a, torch.tensor([1.0, 1.0, 0.0], dtype=torch.bfloat16))


def _model_sort_tile_by_colour(keys, K, warps=8, warp_size=32, tile=1024):
    """Step-by-step Python model of sort_tile_by_colour (csrc/cuda/cuda_utils.cuh):
    per-warp ranks from groups of equal keys among 32 lanes, per-warp counts, an
    exclusive scan over (colour, warp), then the scatter."""
    n = len(keys)
    per_warp = tile // warps
    counts = [[0] * K for _ in range(warps)]
    rank = [0] * n
    for w in range(warps):
        for r in range(0, per_warp, warp_size):
            lane_keys = [keys[i] if i < n else -1 for i in range(w * per_warp + r, w * per_warp + r + warp_size)]
            base = {k: counts[w][k] for k in set(lane_keys) if k >= 0}  # read before the leader writes
            for lane, k in enumerate(lane_keys):
                if k >= 0:
                    rank[w * per_warp + r + lane] = base[k] + lane_keys[:lane].count(k)
            for k in base:
                counts[w][k] = base[k] + lane_keys.count(k)
    totals = [sum(counts[w][k] for w in range(warps)) for k in range(K)]
    start = [sum(totals[:k]) for k in range(K + 1)]
    offset = [[0] * K for _ in range(warps)]
    for k in range(K):
        off = start[k]
        for w in range(warps):
            offset[w][k], off = off, off + counts[w][k]
    order = [None] * start[K]
    for i, k in enumerate(keys):
        if k >= 0:
            order[offset[i // per_warp][k] + rank[i]] = i
    return order, start


@pytest.mark.parametrize("K,n,seed", [(1, 1024, 0), (2, 1000, 1), (7, 1024, 2), (256, 1024, 3), (256, 37, 4), (3, 1, 5)])
def test_tile_sort_model_is_a_stable_counting_sort(K, n, seed):
    """The algorithm of the CUDA index reductions' tile sort: each colour's pixels
    come out contiguous and in pixel order (so a per-colour sum over them runs in
    pixel order, as the CPU's), out-of-range keys (-1) are dropped, and the
    positions fit uint16_t."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randint(-1, K, (n,), generator=gen).tolist()
    order, start = _model_sort_tile_by_colour(keys, K)
    want = sorted((k, i) for i, k in enumerate(keys) if k >= 0)
    assert order == [i for _, i in want]
    for k in range(K):
        assert [keys[i] for i in order[start[k]:start[k + 1]]] == [k] * (start[k + 1] - start[k])
    assert start[K] == sum(k >= 0 for k in keys) <= 65535
