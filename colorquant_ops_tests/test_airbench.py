"""The airbench classifier (:mod:`colorquant_ops.models.airbench`) and its training recipe
(:mod:`colorquant_ops.experiment.airbench`, ``colorquant train-classifier --arch airbench93``).

Model tests run on random data; the recipe runs end to end on 64 real CIFAR-10 images (the project's
JPEG copy) in batches of 16 for a few epochs, long enough for the lookahead average (every 5 steps,
taken after the last) and the whitening-bias freeze to happen, and an interrupted run resumed with
``--resume`` must end with the same weights, optimizer state and metrics, bit for bit.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from colorquant_ops.experiment import airbench as recipe
from colorquant_ops.experiment import cli, data
from colorquant_ops.experiment.rundir import RunDir
from colorquant_ops.models.airbench import AirbenchNet, patch_whitening, tta_logits
from colorquant_ops.models.classifiers import build_classifier, load_classifier, save_classifier

ARCHIVE = data.find_shared_cifar10_archive()
needs_data = pytest.mark.skipif(
    ARCHIVE is None and not (data.default_cache_dir() / "cifar10-jpeg" / ".extracted").is_file(),
    reason="CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found",
)


def _images(n=64, size=32, seed=0):
    """Correlated, unevenly scaled channels: a second moment far from the identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    return x + 0.7 * torch.randn(n, 1, size, size, generator=g) + 0.2


def _patches(x, k=2):
    return x.unfold(2, k, 1).unfold(3, k, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * k * k)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


def test_whitened_patches_have_identity_second_moment():
    x = _images()
    filters = patch_whitening(x)
    assert filters.shape == (12, 3, 2, 2)
    p = _patches(x).double()
    raw = p.T @ p / len(p)
    assert (raw - torch.eye(12, dtype=torch.float64)).abs().max() > 1  # far from white before
    w = p @ filters.reshape(12, 12).double().T
    assert torch.allclose(w.T @ w / len(w), torch.eye(12, dtype=torch.float64), atol=5e-3)
    # the model's whitening conv: the filters and their negatives, computed on the same images
    model = AirbenchNet(widths=(8, 8, 8))
    model.init_whitening(x)
    out = F.conv2d(x, model.whiten.weight, model.whiten.bias)
    assert out.shape == (64, 24, 31, 31) and torch.equal(model.whiten.bias, torch.zeros(24))
    v = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    assert torch.allclose(v.T @ v / len(v), torch.eye(12, dtype=torch.float64), atol=5e-3)
    assert torch.equal(out[:, 12:], -out[:, :12])


def test_shapes_and_frozen_parameters():
    model = build_classifier("airbench94", 10, 32)
    assert isinstance(model, AirbenchNet)
    small = build_classifier("airbench93", 100, 32)
    assert [g.conv2.out_channels for g in model.groups] == [64, 256, 256]
    assert [g.conv2.out_channels for g in small.groups] == [64, 128, 128]
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert model(torch.randn(1, 3, 64, 48)).shape == (1, 10)  # global max-pool: any size from 9 up
    assert build_classifier("airbench93", 10, 96).groups[2].conv2.out_channels == 128  # not torchvision's
    assert not model.whiten.weight.requires_grad and model.whiten.bias.requires_grad
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert model.head.bias is None
    # Dirac init: each group's second conv starts as the identity
    x = torch.randn(1, 64, 8, 8)
    assert torch.allclose(model.groups[0].conv2(x), x)


def test_eval_forward_is_one_plain_pass():
    model = AirbenchNet(widths=(8, 8, 8)).eval()
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    x = torch.randn(3, 3, 32, 32)
    logits = model(x)
    assert calls == [x.shape]
    x.requires_grad_(True)
    model(x).sum().backward()  # ColorCNN trains through the frozen classifier
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(tta_logits(model, x.detach(), 0), logits)


def test_save_load_round_trip(tmp_path):
    model = build_classifier("airbench93", 10, 32)
    model.init_whitening(_images(16))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
    save_classifier(model, tmp_path / "c.pt", "airbench93", 10, 32, dataset="cifar10", test_acc=0.5)
    loaded = load_classifier(tmp_path / "c.pt")
    assert isinstance(loaded, AirbenchNet)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert "whiten.weight" in theirs and set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not loaded.whiten.weight.requires_grad
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(model.eval()(x), loaded.eval()(x))


def _reflect(i, n):
    return -i if i < 0 else (2 * (n - 1) - i if i > n - 1 else i)


def _view(image, dy, dx, flip):
    """Pixel by pixel: output (i, j) = input (i + dy, j + dx), reflected at the borders; then mirrored."""
    c, h, w = image.shape
    out = torch.empty_like(image)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = image[:, _reflect(i + dy, h), _reflect(j + dx, w)]
    return out.flip(-1) if flip else out


def test_tta_matches_a_loop_over_views():
    torch.manual_seed(0)
    model = AirbenchNet(widths=(8, 16, 16)).eval()
    model.init_whitening(_images(8))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        got = {level: tta_logits(model, x, level) for level in (0, 1, 2)}
        for b in range(len(x)):
            def logit(dy, dx, flip):
                return model(_view(x[b], dy, dx, flip)[None])[0]
            mirror = lambda dy, dx: 0.5 * (logit(dy, dx, False) + logit(dy, dx, True))  # noqa: E731
            expected = {0: logit(0, 0, False), 1: mirror(0, 0),
                        2: 0.5 * mirror(0, 0) + 0.25 * mirror(-1, -1) + 0.25 * mirror(1, 1)}
            for level in (0, 1, 2):
                torch.testing.assert_close(got[level][b], expected[level], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="level"):
        tta_logits(model, x, 3)


# --------------------------------------------------------------------------------------------
# Recipe pieces
# --------------------------------------------------------------------------------------------


def test_augment_batch_matches_pad_and_crop():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    flip = torch.rand(40, generator=g) < 0.5
    shifts = torch.randint(-2, 3, (40, 2), generator=g)
    got = recipe.augment_batch(images, flip, shifts)
    assert got.dtype == torch.uint8
    for b in range(40):
        image = images[b].flip(-1) if flip[b] else images[b]
        padded = F.pad(image[None].float(), (2, 2, 2, 2), mode="reflect")[0]
        dy, dx = shifts[b].tolist()
        assert torch.equal(got[b].float(), padded[:, 2 + dy:34 + dy, 2 + dx:34 + dx]), b


def test_alternating_flip_and_lr_schedule():
    even, odd = recipe.alternating_flip(1000, 0, seed=3), recipe.alternating_flip(1000, 1, seed=3)
    assert torch.equal(even, ~odd) and torch.equal(even, recipe.alternating_flip(1000, 4, seed=3))
    assert 400 < int(even.sum()) < 600
    assert not torch.equal(even, recipe.alternating_flip(1000, 0, seed=4))
    total = 100
    factors = [recipe.lr_factor(s, total) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.2) and factors[23] == pytest.approx(1.0)
    assert factors[total] == pytest.approx(0.07) and max(factors) == pytest.approx(1.0)


def test_recipe_defaults_apply_only_when_not_given():
    parser = cli.build_parser()
    args = parser.parse_args(["train-classifier", "--arch", "airbench94"])
    resolved = recipe._resolve(args)
    assert (resolved.epochs, resolved.batch_size, resolved.lr, resolved.momentum, resolved.weight_decay) == (
        10, 1024, 11.5, 0.85, 0.0153)
    assert (resolved.tta_level, resolved.whiten_bias_epochs, resolved.float32) == (2, 3, False)
    args = parser.parse_args(["train-classifier", "--arch", "airbench94", "--lr", "0.1", "--epochs", "60"])
    resolved = recipe._resolve(args)
    assert (resolved.lr, resolved.epochs, resolved.batch_size) == (0.1, 60, 1024)
    # the other architectures keep train-classifier's defaults, as plain JSON numbers
    args = parser.parse_args(["train-classifier"])
    # (--batch-size: None until train-classifier resolves it per dataset, 128 on CIFAR)
    assert (args.lr, args.epochs, args.batch_size, args.momentum) == (0.1, 60, None, 0.5)
    assert json.loads(json.dumps({"lr": args.lr, "epochs": args.epochs})) == {"lr": 0.1, "epochs": 60}
    assert args.tta_level is None and args.whiten_bias_epochs is None and args.float32 is False
    recipe.plain_defaults(args)  # what train-classifier does for them: plain numbers, loadable with weights_only
    assert type(args.lr) is float and type(args.epochs) is int and args.batch_size is None


# --------------------------------------------------------------------------------------------
# The recipe end to end
# --------------------------------------------------------------------------------------------

# 64 images in batches of 16: 4 steps per epoch; the lookahead average moves at steps 5, 10, 15, 20
# of a 5-epoch run, and the network takes it after step 20; the whitening bias trains in epochs 1-4.
RUN = ["--arch", "airbench93", "--subset", "64", "--test-subset", "32", "--batch-size", "16", "--device", "cpu",
       "--no-progress", "--whiten-bias-epochs", "4", "--seed", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensor-cache")


def _train(out, cache_dir, *extra) -> int:
    return cli.main(["train-classifier", *RUN, "--cache-dir", str(cache_dir), "--out-dir", str(out),
                     *[str(a) for a in extra]])


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "straight"
    assert _train(out, cache_dir, "--epochs", "5") == 0
    return out


@needs_data
def test_run_writes_the_standard_run_directory(straight_run):
    run = straight_run
    for name in ("settings.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "final.pt"):
        assert (run / name).is_file(), name
    settings = json.loads((run / "settings.json").read_text())
    assert settings["arch"] == "airbench93" and settings["epochs"] == 5 and settings["lr"] == 11.5
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]
    for m in metrics:
        assert {"train_loss", "train_acc", "test_loss", "test_acc", "lr", "train_seconds", "step_seconds"} <= set(m)
        assert 0 <= m["test_acc"] <= 1 and m["train_loss"] > 0
    assert "test_acc_tta" in metrics[-1] and all("test_acc_tta" not in m for m in metrics[:-1])
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 5 and state["step"] == 20 and state["lookahead"] is not None
    log = (run / "log.txt").read_text()
    assert "airbench recipe" in log and "done: 5 epochs, 20 steps" in log
    final = torch.load(run / "final.pt", weights_only=True)
    assert final["arch"] == "airbench93" and final["test_acc_tta"] == metrics[-1]["test_acc_tta"]
    model = load_classifier(run / "final.pt")
    assert all(torch.equal(v, state["model"][k]) for k, v in model.state_dict().items())
    # the network took the lookahead average at the end of the last epoch
    assert all(torch.equal(v, state["model"][k]) for k, v in state["lookahead"].items())
    # the whitening filters came from the data and stayed frozen; the bias trained, then froze
    assert not torch.equal(model.whiten.weight, build_classifier("airbench93", 10, 32).whiten.weight)
    assert model.whiten.bias.abs().sum() > 0


@needs_data
def test_lookahead_follows_the_reference_schedule(tmp_path, cache_dir, monkeypatch):
    # every 5 steps with decay 0.95**5 (step / total)**3 from the first step, and the average taken
    # once, after the last step (a decay of 1.0 at the end of each epoch would throw away the steps
    # since the last update)
    decays = []
    update = recipe._Lookahead.update

    def record(self, model, decay):
        decays.append(decay)
        update(self, model, decay)

    monkeypatch.setattr(recipe._Lookahead, "update", record)
    assert _train(tmp_path / "run", cache_dir, "--epochs", "5") == 0
    assert decays == pytest.approx([0.95 ** 5 * (s / 20) ** 3 for s in (5, 10, 15, 20)] + [1.0], rel=1e-12)


@needs_data
def test_interrupted_run_resumes_exactly(tmp_path, cache_dir, straight_run, monkeypatch):
    out = tmp_path / "run"
    append = RunDir.append_metrics

    def interrupt_after_epoch_4(self, record):
        append(self, record)
        if record["epoch"] == 4:
            raise KeyboardInterrupt  # as if the process were stopped after epoch 4 of 5

    with monkeypatch.context() as m:
        m.setattr(RunDir, "append_metrics", interrupt_after_epoch_4)
        assert _train(out, cache_dir, "--epochs", "5") == 130  # the command reports the interruption
    assert not (out / "final.pt").exists()
    assert torch.load(out / "last.pt", weights_only=True)["lookahead"] is not None
    assert _train(out, cache_dir, "--epochs", "5", "--resume") == 0
    assert "resumed from" in (out / "log.txt").read_text()
    a, b = torch.load(out / "last.pt", weights_only=True), torch.load(straight_run / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 20
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in b["lookahead"]:
        assert torch.equal(a["lookahead"][k], b["lookahead"][k]), k
    for k, buf in b["optimizer"]["state"].items():
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], buf["momentum_buffer"])
    strip = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k} for m in ms]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(straight_run))
    # a resume with other recipe settings is refused
    with pytest.raises(ValueError, match="other settings"):
        recipe.train_airbench(cli.build_parser().parse_args(
            ["train-classifier", *RUN, "--cache-dir", str(cache_dir), "--out-dir", str(out), "--epochs", "5",
             "--resume", "--tta-level", "1"]))


@needs_data
def test_resume_with_more_epochs_continues(tmp_path, cache_dir):
    """``--epochs 1`` then ``--epochs 2 --resume`` continues the run (on the 2-epoch schedule from then on:
    not bit-identical to a straight 2-epoch run, whose first epoch saw other lr factors)."""
    out = tmp_path / "run"
    assert _train(out, cache_dir, "--epochs", "1") == 0
    assert _train(out, cache_dir, "--epochs", "2", "--resume") == 0
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 8


@needs_data
def test_colorcnn_trains_against_an_airbench_classifier(tmp_path, cache_dir, straight_run):
    out = tmp_path / "colorcnn"
    assert cli.main(["train", "--classifier", str(straight_run / "final.pt"), "--num-colors", "2", "--width", "4",
                     "--subset", "32", "--test-subset", "16", "--batch-size", "16", "--epochs", "1", "--device", "cpu",
                     "--no-progress", "--cache-dir", str(cache_dir), "--out-dir", str(out)]) == 0
    m = _metrics(out)[0]
    assert 0 <= m["test_acc"] <= 1 and m["train_loss"] > 0
