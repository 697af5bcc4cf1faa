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
