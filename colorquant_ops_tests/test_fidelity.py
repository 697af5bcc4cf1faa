"""The experiment as the paper's code (github.com/hou-yz/color_distillation) runs it: the classifier's
one-cycle schedule, option defaults per dataset / architecture, and runs from before these defaults
resuming as they started. (End-to-end runs: test_train.py, test_reproduce.py.)"""

import argparse
import json

import pytest
import torch

from colorquant_ops.experiment import train
from colorquant_ops.experiment.commands import build_parser
from colorquant_ops.experiment.rundir import RunDir


def _parse(*argv) -> argparse.Namespace:
    return build_parser([train.CLASSIFIER_COMMAND, train.COLORCNN_COMMAND]).parse_args([str(a) for a in argv])


def _sgd(momentum=0.5):
    return torch.optim.SGD([torch.zeros(3, requires_grad=True)], lr=0.1, momentum=momentum, weight_decay=5e-4)


def test_one_cycle_schedule_is_torchs_as_the_authors_configure_it():
    """grid_downsample.py: SGD(lr=0.1, momentum=0.5, weight_decay=5e-4) and OneCycleLR(optimizer,
    max_lr=0.1, steps_per_epoch=len(loader), epochs=60) with torch's defaults, stepped per batch."""
    args = _parse("train-classifier")
    train._resolve_defaults(args)
    assert args.schedule == "onecycle" and args.lr == 0.1 and args.epochs == 60 and args.weight_decay == 5e-4
    args.epochs = 3  # a few epochs of 7 steps
    ours_opt, ref_opt = _sgd(args.momentum), _sgd()
    ours, per_batch = train.classifier_scheduler(args, ours_opt, 7)
    reference = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, steps_per_epoch=7, epochs=3)
    assert per_batch
    seen = []
    for _ in range(3 * 7):
        a, b = ours_opt.param_groups[0], ref_opt.param_groups[0]
        assert (a["lr"], a["momentum"]) == (b["lr"], b["momentum"])
        seen.append((a["lr"], a["momentum"]))
        ours_opt.step(), ref_opt.step()
        ours.step(), reference.step()
    lrs, momenta = zip(*seen)
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1, rel=1e-2)
    assert momenta[0] == pytest.approx(0.95) and min(momenta) == pytest.approx(0.85, abs=1e-3)
    assert lrs[-1] < 1e-4 and momenta[-1] > 0.94  # down to 0.1 / 25 / 1e4, momentum back up


def test_one_cycle_schedule_resumes_exactly_from_its_state():
    args = argparse.Namespace(schedule="onecycle", lr=0.1, epochs=2, lr_steps=None)
    straight_opt = _sgd()
    straight, _ = train.classifier_scheduler(args, straight_opt, 5)
    for _ in range(6):
        straight_opt.step(), straight.step()
    resumed_opt = _sgd()
    resumed, _ = train.classifier_scheduler(args, resumed_opt, 5)
    resumed_opt.load_state_dict(straight_opt.state_dict())
    resumed.load_state_dict(straight.state_dict())
    for _ in range(4):
        for a, b in ((straight_opt, straight), (resumed_opt, resumed)):
            a.step(), b.step()
        assert resumed_opt.param_groups[0]["lr"] == straight_opt.param_groups[0]["lr"]
        assert resumed_opt.param_groups[0]["momentum"] == straight_opt.param_groups[0]["momentum"]


def test_step_schedule_is_named_and_keeps_its_lr_steps():
    args = _parse("train-classifier", "--schedule", "step")
    train._resolve_defaults(args)
    assert args.lr_steps == [20, 40]
    optimizer = _sgd()
    scheduler, per_batch = train.classifier_scheduler(args, optimizer, 7)
    assert not per_batch and isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert optimizer.param_groups[0]["momentum"] == 0.5  # fixed
    with pytest.raises(ValueError, match="--lr-steps is for --schedule step"):
        train._resolve_defaults(_parse("train-classifier", "--lr-steps", "20,40"))


def _old_run(tmp_path, **settings):
    """A run directory as a version before --schedule wrote it."""
    out = tmp_path / "old"
    out.mkdir()
    base = vars(_parse("train-classifier", "--out-dir", out))
    del base["schedule"]
    base.update(batch_size=128, lr_steps=[20, 40], world_size=1)
    (out / "settings.json").write_text(json.dumps({**base, **settings}, default=str))
    (out / "last.pt").write_bytes(b"")
    return out


def test_a_run_from_before_the_schedule_option_resumes_with_the_step_schedule(tmp_path):
    out = _old_run(tmp_path, lr_steps=[8, 12])
    for extra in ((), ("--schedule", "step")):
        args = _parse("train-classifier", "--out-dir", out, "--resume", *extra)
        train._resolve_defaults(args)
        assert (args.schedule, args.lr_steps, args.batch_size) == ("step", [8, 12], 128)
        RunDir(out, resume=True).check_resume_settings(args)  # no change
    args = _parse("train-classifier", "--out-dir", out, "--resume", "--schedule", "onecycle")
    train._resolve_defaults(args)
    with pytest.raises(ValueError, match="--schedule step -> onecycle"):
        RunDir(out, resume=True).check_resume_settings(args)


def test_a_one_cycle_run_resumes_only_to_its_own_epochs(tmp_path):
    out = _old_run(tmp_path, schedule="onecycle", lr_steps=None, epochs=60)
    args = _parse("train-classifier", "--out-dir", out, "--resume")
    train._resolve_defaults(args)
    assert args.schedule == "onecycle" and args.lr_steps is None
    RunDir(out, resume=True).check_resume_settings(args)
    with pytest.raises(ValueError, match="resume it with --epochs 60"):
        train._resolve_defaults(_parse("train-classifier", "--out-dir", out, "--resume", "--epochs", "80"))


# --- colour_norm, STL-10 batch and normalization (color_cnn_downsample.py, grid_downsample.py) ---


@pytest.mark.parametrize("dataset, arch, expected", [
    ("cifar10", "alexnet", 4.0), ("cifar100", "alexnet", 4.0), ("stl10", "alexnet", 1.0), ("tiny200", "alexnet", 1.0),
    ("cifar10", "vgg16", 4.0), ("stl10", "vgg16", 4.0), ("tiny200", "resnet18", 4.0)])
def test_color_norm_default_is_the_authors(dataset, arch, expected):
    """color_norm defaults to 4; `if args.arch == 'alexnet': if 'cifar' not in args.dataset: color_norm = 1`."""
    from colorquant_ops.models.classifiers import build_classifier

    args = _parse("train", "--classifier", "c.pt", "--dataset", dataset)
    train._resolve_defaults(args)
    assert args.color_norm is None  # resolved once the classifier is loaded
    size = {"stl10": 96, "tiny200": 64}.get(dataset, 32)
    assert train._color_norm(args, build_classifier(arch, 10, size)) == expected


def test_a_colorcnn_run_from_before_resumes_with_its_color_norm(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    settings = vars(_parse("train", "--classifier", "c.pt", "--dataset", "stl10", "--out-dir", out))
    settings.update(batch_size=128, color_norm=None)  # what an older version recorded
    (out / "settings.json").write_text(json.dumps(settings, default=str))
    (out / "last.pt").write_bytes(b"")
    args = _parse("train", "--classifier", "c.pt", "--dataset", "stl10", "--out-dir", out, "--resume")
    train._resolve_defaults(args)
    assert args.batch_size == 128 and args.color_norm is None
    RunDir(out, resume=True).check_resume_settings(args)
    from colorquant_ops.models.classifiers import CifarVGG

    assert train._color_norm(args, CifarVGG(10)) == 1.0  # what it ran with: 1 off CIFAR


def test_stl10_batch_is_32_as_the_authors_force_it():
    for command in (("train-classifier",), ("train", "--classifier", "c.pt")):
        args = _parse(*command, "--dataset", "stl10")
        train._resolve_defaults(args)
        assert args.batch_size == 32
        args = _parse(*command, "--dataset", "cifar10")
        train._resolve_defaults(args)
        assert args.batch_size == 128
        args = _parse(*command, "--dataset", "stl10", "--batch-size", "64")
        train._resolve_defaults(args)
        assert args.batch_size == 64  # asked for


def test_stl10_is_normalized_with_imagenet_statistics_and_old_checkpoints_keep_theirs(tmp_path):
    from colorquant_ops.experiment import data
    from colorquant_ops.models.classifiers import CifarAlexNet, save_classifier
    from colorquant_ops.models.colorcnn import ColorCNN, load_colorcnn, save_colorcnn
    from colorquant_ops.normalization import DATASET_NORMALIZATION, NORMALIZATION_BEFORE_RECORDING

    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    old_stl10 = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))
    assert DATASET_NORMALIZATION["stl10"] == imagenet
    assert tuple(data.DATASET_STATS["stl10"][:2]) == imagenet
    assert NORMALIZATION_BEFORE_RECORDING["stl10"] == old_stl10
    # a ColorCNN checkpoint from before it recorded its normalization: STL-10's own statistics
    save_colorcnn(ColorCNN(2, width=2), tmp_path / "old.pt", dataset="stl10")
    assert load_colorcnn(tmp_path / "old.pt").input_normalization == tuple(map(tuple, old_stl10))
    # classifier checkpoints: recorded (as train-classifier now writes), else their dataset's of then
    save_classifier(CifarAlexNet(10), tmp_path / "old-clf.pt", "alexnet", 10, 96, dataset="stl10")
    assert data.classifier_normalization(tmp_path / "old-clf.pt", "stl10") == old_stl10
    save_classifier(CifarAlexNet(10), tmp_path / "new-clf.pt", "alexnet", 10, 96, dataset="stl10",
                    input_normalization=[list(imagenet[0]), list(imagenet[1])])
    assert data.classifier_normalization(tmp_path / "new-clf.pt", "stl10") == imagenet
    save_classifier(CifarAlexNet(10), tmp_path / "cifar.pt", "alexnet", 10, 32, dataset="cifar10")
    assert data.classifier_normalization(tmp_path / "cifar.pt", "cifar10") == DATASET_NORMALIZATION["cifar10"]
