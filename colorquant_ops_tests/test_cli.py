"""``colorquant`` errors across commands: one ``colorquant: error: ...`` line on stderr, exit status 2,
no traceback, and no run directory left behind. (Per-command errors on real data: test_train.py,
test_evaluate.py; under torchrun: test_distributed.py.)"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colorquant_ops.experiment import cli
from colorquant_ops.models.classifiers import build_classifier, save_classifier

REPO = Path(__file__).resolve().parents[1]


def _status(argv) -> int:
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        return exc.code


def test_a_command_is_required(capsys):
    assert _status([]) == 2
    assert "the following arguments are required: command" in capsys.readouterr().err
    assert _status(["fly"]) == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train-classifier", "train", "evaluate"])
def test_argument_types(capsys, command):
    argv = [command, "--batch-size", "-3"] + (["--classifier", "c.pt"] if command != "train-classifier" else [])
    assert _status(argv) == 2
    assert "argument --batch-size: expected a positive integer, got -3" in capsys.readouterr().err


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "classifier.pt"
    torch.manual_seed(0)
    save_classifier(build_classifier("alexnet", 10, 32), path, "alexnet", 10, 32, dataset="cifar10")
    return path


@pytest.mark.parametrize("command", ["train-classifier", "train", "evaluate"])
def test_missing_dataset_leaves_no_run_directory(capsys, tmp_path, classifier, command):
    out = tmp_path / "run"
    argv = [command, "--dataset", "cifar100", "--data-root", tmp_path / "nothing", "--cache-dir", "none",
            "--device", "cpu", "--no-progress", "--out-dir", out]
    if command != "train-classifier":
        argv += ["--classifier", classifier]
    if command == "train":
        argv += ["--width", "4"]
    assert _status(argv) == 2
    err = capsys.readouterr().err.strip()
    # a short first line, then the paths looked at on one more (the library's message has the whole list)
    assert err.startswith("colorquant: error: CIFAR-100 not found under data_root=")
    assert len(err.splitlines()) == 2 and err.splitlines()[1].startswith("  looked for: ")
    assert "Traceback" not in err
    assert not out.exists()


def test_evaluate_error_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "colorquant_ops", "evaluate", "--classifier", str(tmp_path / "missing.pt"),
         "--methods", "median_cut", "bogus", "--out-dir", str(tmp_path / "run"), "--device", "cpu"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("colorquant: error: --methods: unknown method 'bogus'; use any of ")
    assert not (tmp_path / "run").exists()
