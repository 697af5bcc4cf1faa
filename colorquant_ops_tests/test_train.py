"""End-to-end tests of the training engine and its CLI commands (``colorquant train-classifier`` /
``colorquant train``) on a few hundred real CIFAR-10 images (the project's JPEG copy, see test_data.py).

The two straight runs (classifier, ColorCNN) are module fixtures; the resume tests repeat them as
1 epoch + ``--resume`` 1 more and compare the weights bit for bit (also with DataLoader workers).
``colorquant evaluate`` then runs on the trained checkpoints. Deterministic mode is on (conftest.py,
and here around the fixtures too). Multi-process runs: test_distributed.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colorquant_ops.experiment import cli, data, train
from colorquant_ops.models.classifiers import load_classifier
from colorquant_ops.models.colorcnn import ColorCNN, load_colorcnn

ARCHIVE = data.find_shared_cifar10_archive()
pytestmark = pytest.mark.skipif(
    ARCHIVE is None and not (data.default_cache_dir() / "cifar10-jpeg" / ".extracted").is_file(),
    reason="CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found",
)

COMMON = ["--subset", "128", "--test-subset", "64", "--batch-size", "64", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensor-cache")


def _run(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _train_classifier(out_dir, cache_dir, *extra):
    return _run("train-classifier", *COMMON, "--cache-dir", cache_dir, "--out-dir", out_dir, *extra)


def _train_colorcnn(out_dir, cache_dir, classifier, *extra):
    return _run("train", *COMMON, "--cache-dir", cache_dir, "--out-dir", out_dir, "--classifier", classifier,
                "--num-colors", "2", "--width", "4", *extra)


class _Deterministic:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "classifier"
    with _Deterministic():
        assert _train_classifier(out, cache_dir, "--epochs", "2") == 0
    return out


@pytest.fixture(scope="module")
def colorcnn_run(tmp_path_factory, cache_dir, classifier_run):
    out = tmp_path_factory.mktemp("runs") / "colorcnn"
    with _Deterministic():
        assert _train_colorcnn(out, cache_dir, classifier_run / "final.pt", "--epochs", "2") == 0
    return out


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _check_artifacts(run: Path, command: str) -> list[dict]:
    for name in ("settings.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "final.pt"):
        assert (run / name).is_file(), name
    settings = json.loads((run / "settings.json").read_text())
    assert settings["command"] == command and settings["epochs"] == 2 and settings["subset"] == 128
    metrics = _metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"train_loss", "train_acc", "test_acc", "lr", "seconds"} <= set(m)
        assert 0 <= m["test_acc"] <= 1 and m["train_loss"] > 0
    log = (run / "log.txt").read_text()
    assert "epoch 2 train_loss" in log and "done: best test_acc" in log
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step"] == 4  # 128 images, batch 64
    assert {"model", "optimizer", "scheduler", "rng"} <= set(state)
    return metrics


def _one_cycle_reference(epochs: int, steps_per_epoch: int):
    """torch's OneCycleLR configured as the paper's code (grid_downsample.py) does, on a dummy SGD."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.5, weight_decay=5e-4)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, steps_per_epoch=steps_per_epoch,
                                                          epochs=epochs)


def test_classifier_run_writes_artifacts_and_loadable_checkpoints(classifier_run):
    metrics = _check_artifacts(classifier_run, "train-classifier")
    # the default schedule is the paper's one-cycle: stepped per batch (2 a epoch here), from 0.1 / 25
    optimizer, reference = _one_cycle_reference(2, 2)
    for m in metrics:
        assert m["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
        for _ in range(2):
            optimizer.step()
            reference.step()
    assert metrics[0]["lr"] == pytest.approx(0.1 / 25)
    settings = json.loads((classifier_run / "settings.json").read_text())
    assert settings["schedule"] == "onecycle" and settings["lr_steps"] is None
    state = torch.load(classifier_run / "last.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 4 == reference.last_epoch
    assert state["optimizer"]["param_groups"][0]["momentum"] == pytest.approx(optimizer.param_groups[0]["momentum"])
    for name in ("final.pt", "best.pt"):
        model = load_classifier(classifier_run / name).eval()
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    state = torch.load(classifier_run / "last.pt", weights_only=True)
    final = load_classifier(classifier_run / "final.pt").state_dict()
    assert all(torch.equal(final[k], v) for k, v in state["model"].items())


def test_colorcnn_run_writes_artifacts_and_learns(colorcnn_run):
    metrics = _check_artifacts(colorcnn_run, "train")
    for m in metrics:
        assert 1 <= m["test_colors"] <= 2
    # ColorCNN's loss (cross-entropy + colour usage) goes down from the first to the second epoch
    assert metrics[1]["train_loss"] < metrics[0]["train_loss"]
    # cosine schedule stepped per batch: the second epoch starts below the initial lr 0.01
    assert metrics[0]["lr"] == pytest.approx(0.01) and metrics[1]["lr"] < 0.01
    model = load_colorcnn(colorcnn_run / "final.pt")
    assert isinstance(model, ColorCNN)
    assert model.num_colors == 2 and model.width == 4 and model.color_norm == 4.0  # CIFAR default
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.index_map.shape == (2, 32, 32) and int(out.index_map.max()) <= 1
    assert isinstance(load_colorcnn(colorcnn_run / "best.pt"), ColorCNN)


def _assert_same_run(resumed: Path, straight: Path, loader) -> None:
    a, b = loader(resumed / "final.pt").state_dict(), loader(straight / "final.pt").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    opt_a = torch.load(resumed / "last.pt", weights_only=True)["optimizer"]["state"]
    opt_b = torch.load(straight / "last.pt", weights_only=True)["optimizer"]["state"]
    for k in opt_a:
        assert torch.equal(opt_a[k]["momentum_buffer"], opt_b[k]["momentum_buffer"])
    strip = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k} for m in ms]  # noqa: E731
    assert strip(_metrics(resumed)) == strip(_metrics(straight))


def _interrupt_at_epoch(monkeypatch, epoch: int) -> None:
    """Make the next run stop (as on Ctrl-C) when it starts ``epoch`` (0-based), after the previous
    epoch's last.pt: a one-cycle schedule spans --epochs, so a run is interrupted, not shortened."""
    set_epoch = train._Setup.set_epoch

    def interrupted(self, e):
        if e == epoch:
            monkeypatch.setattr(train._Setup, "set_epoch", set_epoch)
            raise KeyboardInterrupt
        set_epoch(self, e)

    monkeypatch.setattr(train._Setup, "set_epoch", interrupted)


def test_classifier_resume_is_exact(tmp_path, cache_dir, classifier_run, monkeypatch):
    out = tmp_path / "run"
    _interrupt_at_epoch(monkeypatch, 1)
    with _Deterministic():
        assert _train_classifier(out, cache_dir, "--epochs", "2") == 130
        assert len(_metrics(out)) == 1
        assert _train_classifier(out, cache_dir, "--epochs", "2", "--resume") == 0
    assert "resumed from" in (out / "log.txt").read_text()
    _assert_same_run(out, classifier_run, load_classifier)
    a = torch.load(out / "last.pt", weights_only=True)["scheduler"]
    b = torch.load(classifier_run / "last.pt", weights_only=True)["scheduler"]
    assert a == b  # the one-cycle schedule continued where it stopped


def test_classifier_step_schedule_resume_is_exact(tmp_path, cache_dir):
    """--schedule step (the project's earlier default) still resumes a shortened run exactly."""
    straight, out = tmp_path / "straight", tmp_path / "run"
    step = ("--schedule", "step", "--lr-steps", "1")
    with _Deterministic():
        assert _train_classifier(straight, cache_dir, "--epochs", "2", *step) == 0
        assert _train_classifier(out, cache_dir, "--epochs", "1", *step) == 0
        assert _train_classifier(out, cache_dir, "--epochs", "2", "--resume", *step) == 0
    _assert_same_run(out, straight, load_classifier)
    assert [m["lr"] for m in _metrics(out)] == pytest.approx([0.1, 0.01])


def test_colorcnn_resume_is_exact(tmp_path, cache_dir, classifier_run, colorcnn_run):
    out = tmp_path / "run"
    classifier = classifier_run / "final.pt"
    assert _train_colorcnn(out, cache_dir, classifier, "--epochs", "1") == 0
    assert _train_colorcnn(out, cache_dir, classifier, "--epochs", "2", "--resume") == 0
    _assert_same_run(out, colorcnn_run, load_colorcnn)


def test_colorcnn_options_reach_the_checkpoint(tmp_path, cache_dir, classifier_run):
    out = tmp_path / "run"
    assert _train_colorcnn(out, cache_dir, classifier_run / "final.pt", "--epochs", "1", "--straight-through",
                           "--color-norm", "1", "--color-jitter", "0", "--temperature", "2") == 0
    model = load_colorcnn(out / "final.pt")
    assert model.straight_through and model.color_norm == 1.0 and model.color_jitter == 0.0
    assert model.temperature == 2.0
    assert json.loads((out / "settings.json").read_text())["straight_through"] is True


def test_colorcnn_init_from_starts_from_the_checkpoint(tmp_path, cache_dir, classifier_run, colorcnn_run):
    # lr 0: SGD leaves the parameters where --init-from put them (BatchNorm statistics still move)
    out = tmp_path / "tuned"
    assert _train_colorcnn(out, cache_dir, classifier_run / "final.pt", "--epochs", "1", "--lr", "0",
                           "--init-from", colorcnn_run / "final.pt", "--straight-through") == 0
    source, tuned = load_colorcnn(colorcnn_run / "final.pt"), load_colorcnn(out / "final.pt")
    assert tuned.straight_through and not source.straight_through
    params = dict(tuned.named_parameters())
    for name, value in source.named_parameters():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
    # a run without --init-from starts elsewhere, so the comparison above has teeth
    fresh = tmp_path / "fresh"
    assert _train_colorcnn(fresh, cache_dir, classifier_run / "final.pt", "--epochs", "1", "--lr", "0") == 0
    first = next(iter(source.state_dict()))
    assert not torch.equal(load_colorcnn(fresh / "final.pt").state_dict()[first], source.state_dict()[first])


def test_colorcnn_init_from_rejects_a_checkpoint_that_does_not_fit(capsys, tmp_path, cache_dir, classifier_run,
                                                                   colorcnn_run):
    base = ["train", *COMMON, "--cache-dir", cache_dir, "--classifier", classifier_run / "final.pt", "--epochs", "1"]
    err = _error(capsys, *base, "--num-colors", "4", "--width", "8", "--init-from", colorcnn_run / "final.pt",
                 "--out-dir", tmp_path / "a")
    assert "does not fit this run: num_colors 2 (this run: 4), width 4 (this run: 8)" in err
    assert "is not a ColorCNN checkpoint" in _error(
        capsys, *base, "--num-colors", "2", "--width", "4", "--init-from", classifier_run / "final.pt",
        "--out-dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _error(capsys, *argv) -> str:
    """Run the CLI expecting a failure; return its one stderr message."""
    try:
        status = _run(*argv)
    except SystemExit as exc:  # argparse errors
        status = exc.code
    assert status == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "colorquant" in err and "error: " in err
    return err


def test_cli_bad_arguments(capsys, tmp_path, cache_dir, classifier_run):
    base = ["--cache-dir", cache_dir, *COMMON, "--epochs", "1"]
    assert "invalid choice: 'mnist'" in _error(capsys, "train-classifier", *base, "--dataset", "mnist")
    assert "unknown classifier arch 'nonet'" in _error(
        capsys, "train-classifier", *base, "--arch", "nonet", "--out-dir", tmp_path / "a")
    ckpt = classifier_run / "final.pt"
    assert "num_colors must be in [2, 256], got 1" in _error(
        capsys, "train", *base, "--classifier", ckpt, "--num-colors", "1", "--out-dir", tmp_path / "b")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert "is not a classifier checkpoint" in _error(
        capsys, "train", *base, "--classifier", garbage, "--out-dir", tmp_path / "c")
    assert "classifier checkpoint not found" in _error(
        capsys, "train", *base, "--classifier", tmp_path / "missing.pt", "--out-dir", tmp_path / "d")
    assert "--batch-size: expected a positive integer, got 0" in _error(
        capsys, "train-classifier", *base, "--batch-size", "0")
    # the arguments and checkpoints are checked before the run directory is written
    for name in "abcd":
        assert not (tmp_path / name).exists(), name
    assert "the following arguments are required: --classifier" in _error(capsys, "train", *base)
    assert "no checkpoint to resume from" in _error(
        capsys, "train-classifier", *base, "--out-dir", tmp_path / "e", "--resume")
    assert "holds a run already" in _error(capsys, "train-classifier", *base, "--out-dir", classifier_run)
    settings = (classifier_run / "settings.json").read_text()
    assert "--resume with other settings than" in _error(
        capsys, "train-classifier", *base, "--out-dir", classifier_run, "--resume", "--seed", "1", "--epochs", "2")
    # a one-cycle schedule spans the run's --epochs: it continues to them, not to others
    assert "runs a one-cycle schedule over 2 epochs; resume it with --epochs 2" in _error(
        capsys, "train-classifier", *base, "--out-dir", classifier_run, "--resume")
    assert (classifier_run / "settings.json").read_text() == settings  # the run is left as it was


def test_cli_missing_dataset(capsys, tmp_path):
    err = _error(capsys, "train-classifier", *COMMON, "--dataset", "cifar100", "--data-root", tmp_path / "nothing",
                 "--cache-dir", tmp_path / "cache", "--out-dir", tmp_path / "run")
    assert "CIFAR-100 not found under data_root=" in err and "looked for: " in err and len(err.splitlines()) == 2
    assert not (tmp_path / "run").exists()


def test_cli_error_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "colorquant_ops", "train", "--classifier", str(tmp_path / "missing.pt"),
         "--out-dir", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=600,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"colorquant: error: classifier checkpoint not found: {tmp_path / 'missing.pt'}"]


def test_classifier_loss_goes_down(tmp_path, cache_dir):
    # AlexNet sits at ln(10) = 2.303 for its first steps at the paper's lr 0.1 and momentum 0.5; on
    # 16 images with momentum 0.9 it fits them within ten steps (one batch an epoch)
    out = tmp_path / "run"
    assert _run("train-classifier", "--subset", "16", "--test-subset", "8", "--batch-size", "16", "--epochs", "10",
                "--schedule", "step", "--momentum", "0.9", "--device", "cpu", "--no-progress", "--cache-dir", cache_dir,
                "--out-dir", out) == 0
    losses = [m["train_loss"] for m in _metrics(out)]
    assert len(losses) == 10
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.03, losses


def test_resume_with_workers_is_exact(tmp_path, cache_dir):
    # With DataLoader workers the augmentations are drawn in the workers, seeded from a base seed the
    # loader draws from its per-epoch generator: resuming reproduces them.
    args = ["--subset", "32", "--test-subset", "16", "--batch-size", "16", "--workers", "2", "--device", "cpu",
            "--no-progress", "--schedule", "step"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with _Deterministic():
        assert _run("train-classifier", *args, "--cache-dir", cache_dir, "--out-dir", straight, "--epochs", "2") == 0
        assert _run("train-classifier", *args, "--cache-dir", cache_dir, "--out-dir", resumed, "--epochs", "1") == 0
        assert _run("train-classifier", *args, "--cache-dir", cache_dir, "--out-dir", resumed, "--epochs", "2",
                    "--resume") == 0
    _assert_same_run(resumed, straight, load_classifier)


def test_evaluate_the_trained_checkpoints(tmp_path, cache_dir, classifier_run, colorcnn_run):
    """The end of the chain: train-classifier -> train -> evaluate, one row per method and K."""
    out = tmp_path / "eval"
    assert _run("evaluate", "--classifier", classifier_run / "final.pt", "--colorcnn", colorcnn_run / "final.pt",
                "--methods", "colorcnn", "median_cut", "--dither", "off", "--num-colors", "2", "4",
                "--jpeg-qualities", "50", "--test-subset", "16", "--batch-size", "16", "--device", "cpu",
                "--no-progress", "--cache-dir", cache_dir, "--out-dir", out) == 0
    rows = {(r["method"], r["num_colors"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert set(rows) == {("full colour", None), ("colorcnn", 2), ("colorcnn", 4), ("median_cut", 2),
                         ("median_cut", 4), ("jpeg", None)}
    for key in [("colorcnn", 2), ("median_cut", 2), ("median_cut", 4)]:
        assert rows[key]["images"] == 16 and 0 <= rows[key]["accuracy"] <= 1
        assert 1 <= rows[key]["colors"] <= key[1] and rows[key]["bpp"] > 0
    assert rows[("colorcnn", 4)]["note"].startswith("skipped")  # only a K=2 ColorCNN was trained
    for name in ("results.csv", "results.md", "accuracy_vs_bits.png", "accuracy_vs_bpp.png"):
        assert (out / name).is_file(), name


# --- ColorCNN+ (train --model colorcnn+) ------------------------------------------------------

PLUS = ["--model", "colorcnn+", "--width", "4", "--train-colors", "2", "16", "--eval-colors", "2", "4"]


def _train_plus(out_dir, cache_dir, classifier, *extra):
    return _run("train", *COMMON, "--cache-dir", cache_dir, "--out-dir", out_dir, "--classifier", classifier,
                *PLUS, *extra)


@pytest.fixture(scope="module")
def plus_run(tmp_path_factory, cache_dir, classifier_run):
    out = tmp_path_factory.mktemp("runs") / "plus"
    with _Deterministic():
        assert _train_plus(out, cache_dir, classifier_run / "final.pt", "--epochs", "2") == 0
    return out


def test_plus_run_writes_artifacts_and_evaluates_every_k(plus_run):
    from colorquant_ops.models import load_colorcnn_plus

    metrics = _check_artifacts(plus_run, "train")
    for m in metrics:
        assert {"test_acc_k2", "test_acc_k4", "test_colors_k2", "test_colors_k4"} <= set(m)
        assert m["test_acc"] == pytest.approx((m["test_acc_k2"] + m["test_acc_k4"]) / 2)
        assert 1 <= m["test_colors_k2"] <= 2 and 1 <= m["test_colors_k4"] <= 4
    settings = json.loads((plus_run / "settings.json").read_text())
    assert settings["model"] == "colorcnn+" and settings["alpha"] == 0.0 and settings["imitation"] == 1.0
    model = load_colorcnn_plus(plus_run / "final.pt")
    assert model.max_colors == 16 and model.width == 4
    assert model.input_normalization is not None  # trained on normalized images: takes [0, 1] ones
    # training moved the offsets away from zero (the untrained model is k-means)
    assert model.head[-1].weight.abs().sum() > 0


def test_plus_train_colors_are_a_function_of_seed_and_step():
    ks = [train.sample_train_colors(0, step, 2, 256) for step in range(2000)]
    assert ks == [train.sample_train_colors(0, step, 2, 256) for step in range(2000)]
    assert min(ks) == 2 and 240 <= max(ks) <= 256
    # log-uniform: about as many steps in [2, 16) as in [16, 128)
    low, high = sum(k < 16 for k in ks), sum(16 <= k < 128 for k in ks)
    assert abs(low - high) < 200
    assert ks != [train.sample_train_colors(1, step, 2, 256) for step in range(2000)]
    assert {train.sample_train_colors(3, s, 5, 5) for s in range(10)} == {5}


def test_plus_power_of_two_fraction():
    # fraction 0 draws what runs from before the option drew (they resume unchanged)
    assert [train.sample_train_colors(0, s, 2, 256, 0.0) for s in range(500)] == \
        [train.sample_train_colors(0, s, 2, 256) for s in range(500)]
    # fraction 1: only powers of two, every exponent in range, each about equally often
    ks = [train.sample_train_colors(0, s, 3, 40, 1.0) for s in range(3000)]
    assert set(ks) == {4, 8, 16, 32}
    assert all(abs(ks.count(k) - 750) < 120 for k in (4, 8, 16, 32))
    # a fraction in between: the powers of two gain about that share, the rest stays log-uniform
    mixed = [train.sample_train_colors(1, s, 2, 256, 0.5) for s in range(8000)]
    assert 0.07 < mixed.count(2) / 8000 < 0.11 and 0.025 < mixed.count(3) / 8000 < 0.045
    assert len(set(mixed)) > 100
    assert mixed == [train.sample_train_colors(1, s, 2, 256, 0.5) for s in range(8000)]
    # no power of two in the range: the log-uniform draw
    assert {train.sample_train_colors(2, s, 5, 7, 1.0) for s in range(200)} == {5, 6, 7}


def test_plus_resume_is_exact(tmp_path, cache_dir, classifier_run, plus_run):
    from colorquant_ops.models import load_colorcnn_plus

    out = tmp_path / "run"
    classifier = classifier_run / "final.pt"
    assert _train_plus(out, cache_dir, classifier, "--epochs", "1") == 0
    assert _train_plus(out, cache_dir, classifier, "--epochs", "2", "--resume") == 0
    _assert_same_run(out, plus_run, load_colorcnn_plus)


def test_plus_init_from_starts_from_the_checkpoint(capsys, tmp_path, cache_dir, classifier_run, plus_run,
                                                  colorcnn_run):
    from colorquant_ops.models import load_colorcnn_plus
    # lr 0: SGD leaves the parameters where --init-from put them; another K range and k-means
    # iteration count are fine-tuning options, not the architecture
    out = tmp_path / "tuned"
    assert _train_plus(out, cache_dir, classifier_run / "final.pt", "--epochs", "1", "--lr", "0", "--init-from",
                       plus_run / "final.pt", "--train-colors", "2", "8", "--kmeans-iters", "3") == 0
    source, tuned = load_colorcnn_plus(plus_run / "final.pt"), load_colorcnn_plus(out / "final.pt")
    assert tuned.max_colors == 8 and tuned.kmeans_iters == 3
    params = dict(tuned.named_parameters())
    for name, value in source.named_parameters():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)
    fresh = tmp_path / "fresh"  # without --init-from the weights start elsewhere: the check above has teeth
    assert _train_plus(fresh, cache_dir, classifier_run / "final.pt", "--epochs", "1", "--lr", "0") == 0
    assert any(not torch.equal(p, params[n]) for n, p in load_colorcnn_plus(fresh / "final.pt").named_parameters())
    base = ["--epochs", "1", "--init-from"]
    err = _error(capsys, "train", *COMMON, "--cache-dir", cache_dir, "--classifier", classifier_run / "final.pt",
                 *PLUS[:2], "--width", "8", *PLUS[4:], *base, plus_run / "final.pt", "--out-dir", tmp_path / "a")
    assert "does not fit this run: width 4 (this run: 8)" in err
    err = _error(capsys, "train", *COMMON, "--cache-dir", cache_dir, "--classifier", classifier_run / "final.pt",
                 *PLUS, *base, colorcnn_run / "final.pt", "--out-dir", tmp_path / "b")
    assert "is not a ColorCNN+ checkpoint" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plus_option_errors(capsys, tmp_path, cache_dir, classifier_run):
    base = ["--cache-dir", cache_dir, *COMMON, "--epochs", "1", "--classifier", classifier_run / "final.pt"]
    assert "--num-colors, --straight-through: not an option of --model colorcnn+" in _error(
        capsys, "train", *base, "--model", "colorcnn+", "--num-colors", "4", "--straight-through",
        "--out-dir", tmp_path / "a")
    assert "--train-colors 8 4: need 2 <= MIN <= MAX <= 256" in _error(
        capsys, "train", *base, "--model", "colorcnn+", "--train-colors", "8", "4", "--out-dir", tmp_path / "b")
    assert "--eval-colors: K must be in 2..16 (the --train-colors MAX), got 32" in _error(
        capsys, "train", *base, "--model", "colorcnn+", "--train-colors", "2", "16", "--eval-colors", "32",
        "--out-dir", tmp_path / "c")
    assert "--eval-colors, --imitation: options of --model colorcnn+, not of ColorCNN" in _error(
        capsys, "train", *base, "--imitation", "0.5", "--eval-colors", "2", "--out-dir", tmp_path / "d")
    for model in ("colorcnn", "colorcnn+"):
        assert "--boundary must be a finite number >= 0, got -1.0" in _error(
            capsys, "train", *base, "--model", model, "--boundary", "-1", "--out-dir", tmp_path / "e")
    assert "--boundary-schedule: options of --model colorcnn+, not of ColorCNN" in _error(
        capsys, "train", *base, "--boundary", "1", "--boundary-schedule", "log2", "--out-dir", tmp_path / "f")
    assert "--power-of-two-fraction must be in [0, 1], got 1.5" in _error(
        capsys, "train", *base, "--model", "colorcnn+", "--power-of-two-fraction", "1.5", "--out-dir", tmp_path / "g")
    assert "--power-of-two-fraction: options of --model colorcnn+, not of ColorCNN" in _error(
        capsys, "train", *base, "--power-of-two-fraction", "0.5", "--out-dir", tmp_path / "h")
    for name in "abcdefgh":
        assert not (tmp_path / name).exists(), name


def test_distillation_reaches_the_training(capsys, tmp_path, cache_dir, classifier_run):
    classifier = classifier_run / "final.pt"
    with _Deterministic():
        assert _train_colorcnn(tmp_path / "plain", cache_dir, classifier, "--epochs", "1") == 0
        assert _train_colorcnn(tmp_path / "kd", cache_dir, classifier, "--epochs", "1", "--distill", "2",
                               "--distill-temperature", "4") == 0
        assert _train_plus(tmp_path / "plus-kd", cache_dir, classifier, "--epochs", "1", "--distill", "1") == 0
    settings = json.loads((tmp_path / "kd" / "settings.json").read_text())
    assert (settings["distill"], settings["distill_temperature"]) == (2.0, 4.0)
    plain, kd = (load_colorcnn(tmp_path / name / "final.pt") for name in ("plain", "kd"))
    # the same seed and batches: only the distillation term's gradient can make the weights differ
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), kd.parameters()))
    base = ["--cache-dir", cache_dir, *COMMON, "--epochs", "1", "--classifier", classifier]
    for model in ("colorcnn", "colorcnn+"):
        assert "--distill must be a finite number >= 0, got -1.0" in _error(
            capsys, "train", *base, "--model", model, "--distill", "-1", "--out-dir", tmp_path / "a")
    assert "--distill-temperature must be a finite number > 0, got 0.0" in _error(
        capsys, "train", *base, "--distill", "1", "--distill-temperature", "0", "--out-dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_logit_noise_reaches_the_training(capsys, tmp_path, cache_dir, classifier_run):
    classifier = classifier_run / "final.pt"
    with _Deterministic():
        assert _train_colorcnn(tmp_path / "plain", cache_dir, classifier, "--epochs", "1") == 0
        assert _train_colorcnn(tmp_path / "noisy", cache_dir, classifier, "--epochs", "1", "--logit-noise", "1") == 0
        assert _train_plus(tmp_path / "plus-plain", cache_dir, classifier, "--epochs", "1") == 0
        assert _train_plus(tmp_path / "plus-noisy", cache_dir, classifier, "--epochs", "1", "--logit-noise", "1") == 0
    from colorquant_ops.models import load_colorcnn_plus

    for load, names in ((load_colorcnn, ("plain", "noisy")), (load_colorcnn_plus, ("plus-plain", "plus-noisy"))):
        plain, noisy = (load(tmp_path / name / "final.pt") for name in names)
        assert noisy.logit_noise == 1.0 and plain.logit_noise == 0.0
        # the same seed and batches: only the noise can make the weights differ
        assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), noisy.parameters()))
    base = ["--cache-dir", cache_dir, *COMMON, "--epochs", "1", "--classifier", classifier]
    assert "--logit-noise must be a finite number >= 0, got -1.0" in _error(
        capsys, "train", *base, "--logit-noise", "-1", "--out-dir", tmp_path / "a")
    assert "--logit-noise must be a finite number >= 0, got -1.0" in _error(
        capsys, "train", *base, "--model", "colorcnn+", "--logit-noise", "-1", "--out-dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_plus_boundary_term_reaches_the_training(tmp_path, cache_dir, classifier_run):
    from colorquant_ops.models import load_colorcnn_plus

    classifier = classifier_run / "final.pt"
    with _Deterministic():
        assert _train_plus(tmp_path / "plain", cache_dir, classifier, "--epochs", "1") == 0
        assert _train_plus(tmp_path / "boundary", cache_dir, classifier, "--epochs", "1", "--boundary", "5") == 0
        assert _train_plus(tmp_path / "scheduled", cache_dir, classifier, "--epochs", "1", "--boundary", "5",
                           "--boundary-schedule", "inverse-log2") == 0
    assert json.loads((tmp_path / "boundary" / "settings.json").read_text())["boundary"] == 5.0
    assert json.loads((tmp_path / "scheduled" / "settings.json").read_text())["boundary_schedule"] == "inverse-log2"
    plain, smooth = (load_colorcnn_plus(tmp_path / name / "final.pt") for name in ("plain", "boundary"))
    # the same seed and batches: only the boundary term's gradient can make the weights differ
    assert not torch.equal(plain.head[-1].weight, smooth.head[-1].weight)
    assert not torch.equal(smooth.head[-1].weight, load_colorcnn_plus(tmp_path / "scheduled" / "final.pt").head[-1].weight)


def test_evaluate_colorcnn_plus_rows(tmp_path, cache_dir, classifier_run, plus_run):
    out = tmp_path / "eval"
    assert _run("evaluate", "--classifier", classifier_run / "final.pt", "--colorcnn-plus", plus_run / "final.pt",
                "--methods", "colorcnn+", "colorcnn", "--num-colors", "2", "8", "--jpeg-qualities",
                "--test-subset", "16", "--batch-size", "16", "--device", "cpu", "--no-progress",
                "--cache-dir", cache_dir, "--out-dir", out) == 0
    rows = {(r["method"], r["num_colors"]): r for r in json.loads((out / "results.json").read_text())["rows"]}
    for k in (2, 8):
        row = rows[("colorcnn+", k)]
        assert row["images"] == 16 and 0 <= row["accuracy"] <= 1 and 1 <= row["colors"] <= k and row["bpp"] > 0
        assert rows[("colorcnn", k)]["note"].startswith("skipped")
        assert row["note"] == ""  # the checkpoint's smoothing: none
    smoothed = tmp_path / "eval-smoothed"
    assert _run("evaluate", "--classifier", classifier_run / "final.pt", "--colorcnn-plus", plus_run / "final.pt",
                "--methods", "colorcnn+", "--num-colors", "8", "--jpeg-qualities", "--plus-smoothing", "1",
                "--test-subset", "16", "--batch-size", "16", "--device", "cpu", "--no-progress",
                "--cache-dir", cache_dir, "--out-dir", smoothed) == 0
    row = next(r for r in json.loads((smoothed / "results.json").read_text())["rows"] if r["method"] == "colorcnn+")
    assert row["note"] == "smoothing 1" and 1 <= row["colors"] <= 8
    assert "serves up to 16 colours, --num-colors asks for 32" in _error_evaluate(
        tmp_path, cache_dir, classifier_run, plus_run)


def _error_evaluate(tmp_path, cache_dir, classifier_run, plus_run) -> str:
    with pytest.raises(ValueError) as info:
        from colorquant_ops.experiment import evaluate as ev
        args = cli.build_parser().parse_args([
            "evaluate", "--classifier", str(classifier_run / "final.pt"), "--colorcnn-plus",
            str(plus_run / "final.pt"), "--num-colors", "32", "--test-subset", "4", "--device", "cpu",
            "--cache-dir", str(cache_dir), "--out-dir", str(tmp_path / "bad")])
        ev.evaluate(args)
    return str(info.value)
