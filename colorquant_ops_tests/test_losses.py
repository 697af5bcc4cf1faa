"""Tests of colorquant_ops.losses: the colour-usage regularizer, the colour
variance, and ColorCNNLoss (the paper's objective) with a tiny ColorCNN."""

import math

import pytest
import torch
import torch.nn.functional as F

from colorquant_ops.models.classifiers import CifarAlexNet
from colorquant_ops.losses import (ColorCNNLoss, ColorCNNPlusLoss, boundary_loss, color_usage_loss, color_variance_loss,
                                   distillation_loss, soft_palette)
from colorquant_ops.models import ColorCNN


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: these small models run ~100x slower with 2 OpenMP
    # threads on a CPU shared with other work (threads spin at barriers).
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _one_hot_regions(B, K, H, W):
    """Index map in which every colour owns some pixels, and its one-hot probs."""
    idx = torch.stack([torch.randperm(H * W) % K for _ in range(B)]).reshape(B, H, W)
    probs = F.one_hot(idx, K).permute(0, 3, 1, 2).float()
    return idx, probs


# ----------------------------------------------------------------------------- color_usage_loss


@pytest.mark.parametrize("K", [2, 5, 16])
def test_color_usage_zero_when_every_color_used(K):
    _, probs = _one_hot_regions(3, K, 6, 7)
    assert color_usage_loss(probs).item() == 0.0


@pytest.mark.parametrize("K", [2, 5, 16])
def test_color_usage_uniform(K):
    probs = torch.full((2, K, 4, 4), 1.0 / K)
    expected = math.log2(K) * (1 - 1 / K)
    assert color_usage_loss(probs).item() == pytest.approx(expected, rel=1e-6)


def test_color_usage_matches_authors_formula():
    B, K, H, W = 3, 6, 5, 4
    probs = torch.softmax(torch.randn(B, K, H, W), dim=1)
    # the authors' code: np.log2(K) * (1 - prob.view(B, K, -1).max(dim=2)[0].mean())
    ref = math.log2(K) * (1 - probs.view(B, K, -1).max(dim=2)[0].mean())
    torch.testing.assert_close(color_usage_loss(probs), ref)
    # one colour takes every pixel, three are never used: maxima (1, 0, 0, 0)
    probs2 = torch.zeros(1, 4, 2, 2)
    probs2[0, 0] = 1.0
    assert color_usage_loss(probs2).item() == pytest.approx(2 * (1 - 1 / 4))


def test_color_usage_bad_input():
    with pytest.raises(ValueError, match="4-D"):
        color_usage_loss(torch.rand(2, 3, 4))
    with pytest.raises(TypeError):
        color_usage_loss(torch.ones(1, 2, 3, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- color_variance_loss


def _variance_brute_force(image, probs, palette):
    image, probs, palette = image.double(), probs.double(), palette.double()
    B, C, H, W = image.shape
    K = probs.shape[1]
    total = 0.0
    for b in range(B):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    for k in range(K):
                        total += probs[b, k, y, x].item() * (image[b, c, y, x].item() - palette[b, k, c].item()) ** 2
    return total / (B * C * H * W)


def test_color_variance_zero_for_exact_one_hot():
    B, K, C, H, W = 2, 4, 3, 5, 6
    idx, probs = _one_hot_regions(B, K, H, W)
    palette = torch.rand(B, K, C)
    image = torch.stack([palette[b][idx[b]].permute(2, 0, 1) for b in range(B)])  # [B, C, H, W]
    assert color_variance_loss(image, probs, palette).item() == 0.0
    # the soft palette of such an image is its palette, so the default is 0 too
    torch.testing.assert_close(soft_palette(image, probs), palette)
    assert color_variance_loss(image, probs).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 5), (1, 5, 1, 3, 3)])
def test_color_variance_matches_brute_force(shape):
    B, K, C, H, W = shape
    image = torch.randn(B, C, H, W)
    probs = torch.softmax(2 * torch.randn(B, K, H, W), dim=1)
    palette = torch.randn(B, K, C)
    got = color_variance_loss(image, probs, palette)
    assert got.item() == pytest.approx(_variance_brute_force(image, probs, palette), rel=1e-5)
    # default palette: the probability-weighted mean colour
    pal = soft_palette(image, probs)
    p64 = probs.double()
    ref = (p64.unsqueeze(2) * image.double().unsqueeze(1)).sum((3, 4)) / p64.sum((2, 3)).unsqueeze(2)
    torch.testing.assert_close(pal.double(), ref, rtol=1e-5, atol=1e-6)
    assert color_variance_loss(image, probs).item() == pytest.approx(_variance_brute_force(image, probs, pal), rel=1e-5)


def test_color_variance_bad_shapes():
    image, probs = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 4, 4)
    with pytest.raises(ValueError, match="palette"):
        color_variance_loss(image, probs, torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match="agree"):
        color_variance_loss(image, torch.rand(2, 5, 4, 3))


# ----------------------------------------------------------------------------- ColorCNNLoss


def _setup(num_colors=4, train=True):
    model = ColorCNN(num_colors, width=4).train(train)
    classifier = CifarAlexNet(10).eval()
    for p in classifier.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])
    return model, classifier, x, y


def test_defaults_are_the_papers():
    loss = ColorCNNLoss()
    assert (loss.alpha, loss.beta, loss.gamma) == (1.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        ColorCNNLoss(alpha=-1)


def test_zero_weights_is_cross_entropy():
    model, classifier, x, y = _setup()
    out = model(x)
    logits = classifier(out.quantized)
    total, terms = ColorCNNLoss(alpha=0, beta=0, gamma=0)(logits, y, out, x)
    assert torch.equal(total, F.cross_entropy(logits, y))
    assert set(terms) == {"total", "cross_entropy", "color_usage", "color_variance", "reconstruction", "boundary",
                          "distillation"}
    assert all(isinstance(v, float) for v in terms.values())
    assert terms["total"] == terms["cross_entropy"] == pytest.approx(total.item())
    assert terms["color_usage"] > 0 and terms["color_variance"] > 0 and terms["reconstruction"] > 0
    assert 0 < terms["boundary"] < 1
    assert terms["distillation"] == 0.0  # no teacher logits: nothing to log


def test_total_is_weighted_sum():
    model, classifier, x, y = _setup()
    out = model(x)
    logits = classifier(out.quantized)
    alpha, beta, gamma, boundary = 0.7, 0.3, 2.0, 1.5
    total, terms = ColorCNNLoss(alpha, beta, gamma, boundary=boundary)(logits, y, out, x)
    expected = (
        F.cross_entropy(logits, y)
        + alpha * color_usage_loss(out.probs)
        + beta * color_variance_loss(x, out.probs, soft_palette(x, out.probs))
        + gamma * F.mse_loss(out.quantized, x)
        + boundary * boundary_loss(out.probs)
    )
    torch.testing.assert_close(total, expected)
    weighted = terms["cross_entropy"] + alpha * terms["color_usage"] + beta * terms["color_variance"]
    weighted += gamma * terms["reconstruction"] + boundary * terms["boundary"]
    assert terms["total"] == pytest.approx(weighted, rel=1e-5)
    with pytest.raises(ValueError, match="boundary must be a finite number >= 0"):
        ColorCNNLoss(boundary=-0.1)


# ----------------------------------------------------------------------------- distillation_loss


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_distillation_loss_matches_the_definition(temperature):
    student, teacher = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    p_teacher = torch.softmax(teacher / temperature, 1)
    kl = (p_teacher * (p_teacher.log() - torch.log_softmax(student / temperature, 1))).sum(1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, temperature).double(),
                               temperature ** 2 * kl, rtol=1e-6, atol=1e-7)
    assert distillation_loss(teacher, teacher, temperature).abs().item() < 1e-6  # the same distribution: 0


def test_distillation_loss_gradient_reaches_the_student_only():
    student = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    distillation_loss(student, teacher, 2.0).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None
    fixed = teacher.detach()
    torch.autograd.gradcheck(lambda s: distillation_loss(s, fixed, 3.0), (student.detach().requires_grad_(),))


def test_distillation_loss_bad_input():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="same shape"):
        distillation_loss(x, torch.randn(3, 9))
    with pytest.raises(ValueError, match="must be 2-D"):
        distillation_loss(x[None], x[None])
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        distillation_loss(x, x, 0.0)


def test_distillation_term_in_both_objectives():
    model, classifier, x, y = _setup()
    out = model(x)
    logits = classifier(out.quantized)
    teacher = classifier(x).detach()
    total, terms = ColorCNNLoss(distill=0.5, distill_temperature=2.0)(logits, y, out, x, teacher)
    plain, _ = ColorCNNLoss()(logits, y, out, x)
    torch.testing.assert_close(total, plain + 0.5 * distillation_loss(logits, teacher, 2.0))
    assert terms["distillation"] == pytest.approx(distillation_loss(logits, teacher, 2.0).item(), rel=1e-5)
    with pytest.raises(ValueError, match="distill > 0 needs teacher_logits"):
        ColorCNNLoss(distill=1.0)(logits, y, out, x)
    with pytest.raises(ValueError, match="distill_temperature must be a finite number > 0"):
        ColorCNNLoss(distill_temperature=0.0)
    raw = model.logits(x)
    plus_total, plus_terms = ColorCNNPlusLoss(imitation=0.0, distill=2.0)(logits, y, out, x, raw, teacher)
    plus_plain, _ = ColorCNNPlusLoss(imitation=0.0)(logits, y, out, x, raw)
    torch.testing.assert_close(plus_total, plus_plain + 2.0 * distillation_loss(logits, teacher))
    assert plus_terms["distillation"] > 0


# ----------------------------------------------------------------------------- boundary_loss


def _boundary_reference(probs):
    """The definition, pair by pair in float64: P(two neighbours draw different indices)."""
    p = probs.double()
    B, K, H, W = p.shape
    sums = []
    for pairs in ([((i, j), (i, j + 1)) for i in range(H) for j in range(W - 1)],
                  [((i, j), (i + 1, j)) for i in range(H - 1) for j in range(W)]):
        if pairs:
            sums.append(sum(1 - (p[:, :, a[0], a[1]] * p[:, :, b[0], b[1]]).sum(1) for a, b in pairs).mean()
                        / len(pairs))
    return sum(sums) / len(sums) if sums else torch.zeros((), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 1, 6), (3, 4, 5, 1), (2, 5, 1, 1), (1, 7, 3, 3)])
def test_boundary_loss_matches_the_definition(shape):
    probs = torch.softmax(torch.randn(shape, dtype=torch.float64) * 3, dim=1)
    torch.testing.assert_close(boundary_loss(probs), _boundary_reference(probs))
    torch.testing.assert_close(boundary_loss(probs.float()), _boundary_reference(probs).float())


def test_boundary_loss_is_the_edge_fraction_of_one_hot_maps():
    idx, probs = _one_hot_regions(3, 4, 6, 7)
    horizontal = (idx[:, :, 1:] != idx[:, :, :-1]).double().mean()
    vertical = (idx[:, 1:] != idx[:, :-1]).double().mean()
    torch.testing.assert_close(boundary_loss(probs.double()), (horizontal + vertical) / 2)
    flat = F.one_hot(torch.zeros(2, 5, 5, dtype=torch.long), 3).permute(0, 3, 1, 2).float()
    assert float(boundary_loss(flat)) == 0.0  # one colour: no boundary
    for K in (2, 8):  # uniform probabilities: every pair differs with probability 1 - 1/K
        assert float(boundary_loss(torch.full((1, K, 4, 4), 1 / K))) == pytest.approx(1 - 1 / K)


def test_boundary_loss_gradcheck():
    probs = torch.softmax(torch.randn(2, 3, 4, 5, dtype=torch.float64), dim=1).requires_grad_()
    assert torch.autograd.gradcheck(boundary_loss, (probs,))
    single = torch.full((1, 2, 1, 1), 0.5, dtype=torch.float64, requires_grad=True)
    out = boundary_loss(single)
    out.backward()
    assert float(out.detach()) == 0.0 and single.grad is not None


def test_boundary_loss_bad_input():
    with pytest.raises(ValueError, match="probs must be 4-D"):
        boundary_loss(torch.rand(2, 3, 4))
    with pytest.raises(TypeError, match="probs must be a floating-point tensor"):
        boundary_loss(torch.ones(1, 2, 3, 3, dtype=torch.long))


@pytest.mark.parametrize("weights", [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0.5, 0.5)])
def test_gradients_reach_colorcnn_logits(weights):
    model, classifier, x, y = _setup()
    saved = {}

    def keep(_module, _inp, logits):
        logits.retain_grad()
        saved["logits"] = logits

    model.head.register_forward_hook(keep)
    out = model(x)
    ce_free = weights != (0, 0, 0)
    logits = classifier(out.quantized)
    if ce_free:  # isolate the regularizers: a CE that carries no gradient
        logits = logits.detach()
    total, _ = ColorCNNLoss(*weights)(logits, y, out, x)
    total.backward()
    g = saved["logits"].grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    assert all(p.grad is None for p in classifier.parameters())
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert model.head[2].weight.grad.abs().sum() > 0


def test_eval_mode_output():
    model, classifier, x, y = _setup(train=False)
    with torch.no_grad():
        out = model(x)
        assert out.index_map is not None
        total, terms = ColorCNNLoss(1.0, 0.5, 0.5)(classifier(out.quantized), y, out, x)
    assert math.isfinite(total.item())
    assert all(math.isfinite(v) for v in terms.values())
    assert 0 <= terms["color_usage"] <= math.log2(4)


def test_loss_bad_inputs():
    model, classifier, x, y = _setup()
    out = model(x)
    logits = classifier(out.quantized)
    with pytest.raises(TypeError, match="ColorCNNOutput"):
        ColorCNNLoss()(logits, y, tuple(out), x)
    with pytest.raises(ValueError, match="same shape"):
        ColorCNNLoss()(logits, y, out, x[:, :, :16])
