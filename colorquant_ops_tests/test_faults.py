"""Faults and untrusted input (issue 16, points 1-12 and 17): nothing lost, nothing crashes, no file
read or written where it should not be.

* interrupted writers: a process killed mid-write (``RLIMIT_FSIZE`` with the default ``SIGXFSZ``
  action, which Python ignores unless told otherwise, kills it when the file reaches a chosen size) or between two steps (``SIGKILL`` sent by a
  patched step), and a full disk (``RLIMIT_FSIZE`` with ``SIGXFSZ`` ignored: the write fails with
  ``EFBIG``), each in its own process;
* crafted files, small on disk, made here: decompression bombs, FIFOs, truncated images, planted
  links, checkpoints whose headers lie, archives with links, absolute paths and device nodes,
  annotation files pointing outside the data root;
* the command line: one ``colorquant: error:`` line and exit status 2, never a traceback.
"""

import io
import json
import os
import resource
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorquant_ops.experiment import cli, data, presets, quantize_files
from colorquant_ops.experiment.data import archives
from colorquant_ops.models.classifiers import CHECKPOINT_FORMAT as CLASSIFIER_FORMAT
from colorquant_ops.models.classifiers import CifarAlexNet, load_classifier, save_classifier
from colorquant_ops.models.colorcnn import CHECKPOINT_FORMAT as COLORCNN_FORMAT
from colorquant_ops.models.colorcnn import ColorCNN, load_colorcnn, save_colorcnn

ROOT = Path(__file__).resolve().parents[1]
HAVE_CIFAR = data.find_shared_cifar10_archive() is not None or (
    data.default_cache_dir() / "cifar10-jpeg" / ".extracted").is_file()
needs_cifar = pytest.mark.skipif(not HAVE_CIFAR, reason="CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found")
COMMON = ["--subset", "128", "--test-subset", "64", "--batch-size", "64", "--device", "cpu", "--no-progress"]


def _python(code: str, *args, limit_fsize=None, ignore_xfsz=False, timeout=600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the repository on its path), optionally under a file-size limit."""
    def preexec():
        if ignore_xfsz:  # (Python ignores SIGXFSZ anyway): writes beyond the limit fail with EFBIG
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        if limit_fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_fsize, limit_fsize))

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout, preexec_fn=preexec)


def _error(capsys, *argv) -> str:
    """Run the CLI expecting a one-line failure (exit status 2); return that line."""
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("colorquant: error: "), err
    return lines[0]


def _png(path: Path, size=(16, 12), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


# --- 1-3: interrupted and failing writes -------------------------------------------------------


_WRITERS = {
    "save_classifier": """
        from colorquant_ops.models.classifiers import CifarAlexNet, save_classifier
        torch.manual_seed(1)
        save_classifier(CifarAlexNet(), path, "alexnet", 10, 32)
    """,
    "save_colorcnn": """
        from colorquant_ops.models.colorcnn import ColorCNN, save_colorcnn
        torch.manual_seed(1)
        save_colorcnn(ColorCNN(4, width=16), path)
    """,
    "RunDir.save_state": """
        from colorquant_ops.experiment.rundir import RunDir
        RunDir(path.parent, resume=True).save_state({"epoch": 2, "x": torch.ones(300_000)})
    """,
}


def _old_file(kind: str, path: Path) -> None:
    torch.manual_seed(0)
    if kind == "save_classifier":
        save_classifier(CifarAlexNet(), path, "alexnet", 10, 32)
    elif kind == "save_colorcnn":
        save_colorcnn(ColorCNN(4, width=16), path)
    else:
        torch.save({"epoch": 1, "x": torch.zeros(300_000)}, path)


@pytest.mark.parametrize("kind", list(_WRITERS))
def test_a_writer_killed_mid_write_leaves_the_previous_file(tmp_path, kind):
    path = tmp_path / ("last.pt" if kind == "RunDir.save_state" else "final.pt")
    _old_file(kind, path)
    before = path.read_bytes()
    assert len(before) > 200_000
    # SIGXFSZ's default action (Python ignores it; restored here) kills the writer when the file reaches 64 KB
    result = _python(f"import signal, sys, torch\nfrom pathlib import Path\npath = Path(sys.argv[1])\n"
                     "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
                     f"{textwrap.dedent(_WRITERS[kind])}", path, limit_fsize=65536)
    assert result.returncode == -signal.SIGXFSZ, result.stderr
    assert path.read_bytes() == before  # the old checkpoint, whole
    torch.load(path, weights_only=True)


def test_reproduce_counts_a_stage_done_only_when_its_output_loads(tmp_path):
    preset = presets.PRESETS["smoke"]
    classifier, colorcnn, evaluate = preset.stages[0], preset.stages[1], preset.stages[-1]
    for stage in (classifier, colorcnn, evaluate):
        (tmp_path / stage.name).mkdir()
    save_classifier(CifarAlexNet(), tmp_path / "classifier" / "final.pt", "alexnet", 10, 32)
    save_colorcnn(ColorCNN(2, width=4), tmp_path / colorcnn.name / "final.pt")
    (tmp_path / evaluate.name / "results.json").write_text(json.dumps({"rows": []}))
    assert [presets._state(s, tmp_path) for s in (classifier, colorcnn, evaluate)] == ["done"] * 3
    # cut short, as a kill during the write left them
    for stage in (classifier, colorcnn, evaluate):
        path = tmp_path / stage.name / stage.done_marker()
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert [presets._state(s, tmp_path) for s in (classifier, colorcnn, evaluate)] == ["todo"] * 3
    # a classifier checkpoint is not a ColorCNN stage's output
    save_classifier(CifarAlexNet(), tmp_path / colorcnn.name / "final.pt", "alexnet", 10, 32)
    torch.save({}, tmp_path / colorcnn.name / "last.pt")
    assert presets._state(colorcnn, tmp_path) == "resume"


_KILL_AFTER = """
import os, signal, sys
from colorquant_ops.experiment import cli, rundir

step = sys.argv[1]
original = getattr(rundir.RunDir, step)

def step_then_die(self, arg):
    original(self, arg)
    if arg["epoch"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)

setattr(rundir.RunDir, step, step_then_die)
sys.exit(cli.main(sys.argv[2:]))
"""


@needs_cifar
@pytest.mark.parametrize("step", ["save_state", "append_metrics"])
def test_kill_between_last_pt_and_metrics_loses_no_line(tmp_path, step):
    out = tmp_path / "run"
    # the step schedule: a one-cycle schedule is fixed to its --epochs and refuses a longer resume
    argv = ["train-classifier", *COMMON, "--schedule", "step", "--cache-dir", tmp_path / "cache", "--out-dir", out]
    result = _python(_KILL_AFTER, step, *argv, "--epochs", "2")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert cli.main([str(a) for a in argv] + ["--epochs", "3", "--resume"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_file(tmp_path):
    path = tmp_path / "best.pt"
    torch.manual_seed(0)
    save_classifier(CifarAlexNet(), path, "alexnet", 10, 32)
    before = path.read_bytes()
    result = _python("""
        import sys
        from colorquant_ops.models.classifiers import CifarAlexNet, save_classifier
        try:
            save_classifier(CifarAlexNet(), sys.argv[1], "alexnet", 10, 32)
        except OSError as exc:
            print(exc)
            sys.exit(3)
    """, path, limit_fsize=1 << 20, ignore_xfsz=True)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == f"cannot write {path}: File too large"
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # no temporary file left


@needs_cifar
def test_cli_on_a_full_disk_is_one_line(tmp_path):
    cache = tmp_path / "cache"
    assert cli.main(["train-classifier", *COMMON, "--epochs", "1", "--cache-dir", str(cache),
                     "--out-dir", str(tmp_path / "warm")]) == 0  # the tensor cache is written once, here
    out = tmp_path / "run"
    result = _python("import sys\nfrom colorquant_ops.experiment import cli\nsys.exit(cli.main(sys.argv[1:]))",
                     "train-classifier", *COMMON, "--epochs", "1", "--cache-dir", cache, "--out-dir", out,
                     limit_fsize=1 << 20, ignore_xfsz=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"colorquant: error: cannot write {out / 'best.pt'}: File too large"
    assert not (out / "best.pt").exists()


# --- 4-8: untrusted images ---------------------------------------------------------------------


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(path: Path, w: int, h: int) -> Path:
    """A PNG header claiming ``w x h`` pixels (a few dozen bytes)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * (3 * min(w, 64) + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
                     + _png_chunk(b"IEND", b""))
    return path


def _tiff_bomb(path: Path, w: int, h: int) -> Path:
    """A small TIFF whose header claims ``w x h`` pixels (its width and length tags patched)."""
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="TIFF")
    raw = bytearray(buffer.getvalue())
    order = "<" if raw[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", raw[4:8])
    (count,) = struct.unpack(order + "H", raw[ifd:ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        tag, kind, _ = struct.unpack(order + "HHI", raw[entry:entry + 8])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = w if tag == 256 else h
            raw[entry + 8:entry + 12] = struct.pack(order + ("HH" if kind == 3 else "I"), *(
                (value, 0) if kind == 3 else (value,)))
    path.write_bytes(bytes(raw))
    return path


def test_decompression_bombs_are_skipped_with_one_line(tmp_path, capsys):
    good = _png(tmp_path / "good.png")
    png = _png_bomb(tmp_path / "bomb.png", 50000, 50000)
    tif = _tiff_bomb(tmp_path / "bomb.tif", 60000, 60000)
    assert png.stat().st_size < 200 and tif.stat().st_size < 1000
    out = tmp_path / "out"
    line = _error(capsys, "quantize", good, png, tif, "--method", "median_cut", "--num-colors", "4", "-o", out)
    assert str(png) in line and str(tif) in line and "2 of 3 inputs skipped" in line
    assert (out / "good-median_cut-k4.png").is_file() and (out / "sheet.png").is_file()  # the others are processed


def test_pixel_limit(tmp_path, capsys):
    big = _png(tmp_path / "wide.png", (1200, 1000))
    line = _error(capsys, "quantize", big, "--num-colors", "4", "--max-pixels", "1000000", "-o", tmp_path / "out")
    assert line == (f"colorquant: error: {big}: 1200x1000 = 1,200,000 pixels, more than --max-pixels 1,000,000")
    assert not (tmp_path / "out").exists()
    assert "--max-pixels must be >= 1" in _error(capsys, "quantize", big, "--num-colors", "4", "--max-pixels", "0")


def test_count_colors_memory_is_bounded(tmp_path):
    # 3000 x 3000 pixels: the float64 rows of torch.unique alone took 288 MB (and the sort more)
    result = _python("""
        import resource, torch
        from colorquant_ops.quantizers.reference import count_colors
        image = torch.arange(3 * 3000 * 3000, dtype=torch.int64).remainder_(251).to(torch.uint8).view(1, 3, 3000, 3000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        n = int(count_colors(image)[0])
        print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    assert result.returncode == 0, result.stderr
    colors, grown_mb = map(int, result.stdout.split())
    assert colors == 251 and grown_mb < 150, result.stdout


def test_cell_size_is_bounded_and_unused_without_sheet(tmp_path, capsys, monkeypatch):
    image = _png(tmp_path / "tiny.png", (4, 4))
    assert "--cell-size must be in 1..2048, got 5000" in _error(
        capsys, "quantize", image, "--num-colors", "2", "--cell-size", "5000", "-o", tmp_path / "a")
    assert not (tmp_path / "a").exists()

    def no_enlarging(*args):
        raise AssertionError("fit_to_cell called with --no-sheet")

    monkeypatch.setattr(quantize_files, "fit_to_cell", no_enlarging)
    assert cli.main(["quantize", str(image), "--method", "octree", "--num-colors", "2", "--no-sheet",
                     "--cell-size", "2048", "-o", str(tmp_path / "b"), "--no-progress"]) == 0
    assert (tmp_path / "b" / "tiny-octree-k2.png").is_file() and not (tmp_path / "b" / "sheet.png").exists()


def test_outputs_never_follow_links_nor_overwrite_inputs(tmp_path, capsys):
    image = _png(tmp_path / "pic.png")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    outside = tmp_path / "elsewhere" / "sheet.png"
    outside.parent.mkdir()
    (out / "pic-median_cut-k4.png").symlink_to(victim)
    (out / "sheet.png").symlink_to(outside)
    assert cli.main(["quantize", str(image), "--method", "median_cut", "--num-colors", "4", "-o", str(out),
                     "--no-progress"]) == 0
    assert victim.read_text() == "precious" and not outside.exists()
    for name in ("pic-median_cut-k4.png", "sheet.png"):
        assert not (out / name).is_symlink() and Image.open(out / name).size[0] > 0
    # an input named OUT/sheet.png, or an output name, is refused before anything is written
    for name in ("sheet.png", "pic2-median_cut-k4.png"):
        target = tmp_path / "out2" / name
        target.parent.mkdir(exist_ok=True)
        _png(target)
        before = target.read_bytes()
        args = [target] if name == "sheet.png" else [target.parent / "pic2.png"]
        if name != "sheet.png":
            _png(args[0])
            args = [args[0], target]
        line = _error(capsys, "quantize", *args, "--method", "median_cut", "--num-colors", "4",
                      "-o", tmp_path / "out2")
        assert "would overwrite an input image" in line
        assert target.read_bytes() == before


def test_fifo_is_skipped_not_waited_for(tmp_path):
    good = _png(tmp_path / "good.png")
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = _python("import sys\nfrom colorquant_ops.experiment import cli\nsys.exit(cli.main(sys.argv[1:]))",
                     "quantize", good, fifo, "--method", "octree", "--num-colors", "2", "-o", tmp_path / "out",
                     timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"colorquant: error: 1 of 2 inputs skipped: {fifo}: not a regular file (a FIFO)"]
    assert (tmp_path / "out" / "good-octree-k2.png").is_file()


def test_truncated_images_are_named(tmp_path, capsys):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    header_cut = tmp_path / "header.jpg"
    header_cut.write_bytes(buffer.getvalue()[:300])  # PIL: "Truncated File Read", while opening
    data_cut = tmp_path / "data.jpg"
    data_cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # fails only while decoding
    good = _png(tmp_path / "good.png")
    line = _error(capsys, "quantize", header_cut, data_cut, good, "--method", "octree", "--num-colors", "2",
                  "-o", tmp_path / "out", "--no-progress")
    assert f"{header_cut}: cannot read the image header (Truncated File Read)" in line
    assert f"{data_cut}: cannot decode the image" in line
    assert (tmp_path / "out" / "good-octree-k2.png").is_file()


# --- 9-10: untrusted checkpoints ---------------------------------------------------------------


def _max_rss_growth_mb(code: str, *args) -> tuple[str, int]:
    result = _python("import resource, sys\n"
                     "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                     "try:\n" + textwrap.indent(textwrap.dedent(code), "    ") + "\n"
                     "except ValueError as exc:\n"
                     "    print('ValueError:', exc)\n"
                     "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n", *args)
    assert result.returncode == 0, result.stderr
    *message, grown = result.stdout.strip().splitlines()
    return "\n".join(message), int(grown)


def test_classifier_headers_cannot_size_a_huge_model(tmp_path):
    vit = tmp_path / "vit.pt"
    torch.save({"format": CLASSIFIER_FORMAT, "arch": "vit_h_14", "num_classes": 10, "image_size": 224,
                "state_dict": {}}, vit)
    many = tmp_path / "many-classes.pt"
    state = CifarAlexNet().state_dict()
    # the right shapes for 1e6 classes, from a 1-element storage (stride 0)
    state["classifier.1.weight"] = torch.zeros(1).expand(10**6, 256)
    state["classifier.1.bias"] = torch.zeros(1).expand(10**6)
    torch.save({"format": CLASSIFIER_FORMAT, "arch": "alexnet", "num_classes": 10**6, "image_size": 32,
                "state_dict": state}, many)
    lying = tmp_path / "lying.pt"
    torch.save({"format": CLASSIFIER_FORMAT, "arch": "alexnet", "num_classes": 10**6, "image_size": 32,
                "state_dict": CifarAlexNet().state_dict()}, lying)
    assert vit.stat().st_size < 2000
    for path, expected in ((vit, "do not fit"), (many, "holds only 4 bytes of data"), (lying, "do not fit")):
        message, grown = _max_rss_growth_mb(
            "from colorquant_ops.models.classifiers import load_classifier\nload_classifier(sys.argv[1])", path)
        assert message.startswith("ValueError:") and expected in message and str(path) in message, message
        assert grown < 300, (path, grown)
    with pytest.raises(ValueError, match="unknown classifier arch"):
        torch.save({"format": CLASSIFIER_FORMAT, "arch": "nonet", "num_classes": 10, "image_size": 32,
                    "state_dict": {}}, tmp_path / "x.pt")
        load_classifier(tmp_path / "x.pt")
    torch.save({"format": CLASSIFIER_FORMAT, "arch": ["alexnet"], "num_classes": "10", "image_size": 32,
                "state_dict": {}}, tmp_path / "types.pt")
    with pytest.raises(ValueError, match="bad classifier"):
        load_classifier(tmp_path / "types.pt")


def _colorcnn_ckpt(path: Path, **changes) -> Path:
    model = ColorCNN(2, width=4)
    ckpt = {"format": COLORCNN_FORMAT, "config": model.config(), "state_dict": model.state_dict()}
    for key, value in changes.items():
        if key.startswith("config_"):
            ckpt["config"][key[len("config_"):]] = value
        elif value is None:
            del ckpt[key]
        else:
            ckpt[key] = value
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"config": None}, "missing entries ['config']"),
    ({"state_dict": None}, "missing entries ['state_dict']"),
    ({"config": "unet"}, "its config is not a dict"),
    ({"config_depth": 3}, "unknown config entries ['depth']"),
    ({"config_width": "4"}, "width must be an integer"),
    ({"config_width": 10**7}, "do not fit the ColorCNN its header describes"),
    ({"config_num_colors": 300}, "num_colors must be in [2, 256]"),
    ({"config_backbone": "resnet"}, "backbone must be one of"),
    ({"state_dict": {"head.0.weight": torch.zeros(3)}}, "do not fit the ColorCNN"),
    ({"state_dict": [1, 2]}, "state_dict is not a dict of named tensors"),
    ({"dataset": ["cifar10"]}, None),  # an odd extra entry is just carried along
])
def test_malformed_colorcnn_checkpoints_raise_valueerror(tmp_path, changes, message):
    path = _colorcnn_ckpt(tmp_path / "c.pt", **changes)
    if message is None:
        assert load_colorcnn(path).num_colors == 2
        return
    with pytest.raises(ValueError) as info:
        load_colorcnn(path)
    assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_colorcnn_width_header_allocates_nothing(tmp_path):
    path = _colorcnn_ckpt(tmp_path / "wide.pt", config_width=10**7)
    message, grown = _max_rss_growth_mb(
        "from colorquant_ops.models.colorcnn import load_colorcnn\nload_colorcnn(sys.argv[1])", path)
    assert message.startswith("ValueError:") and "do not fit" in message and grown < 300


class _Opaque:  # pickled as a global: torch.load(weights_only=True) refuses it, in many lines
    pass


def _pickled_code_file(path: Path, fmt: str) -> Path:
    torch.save({"format": fmt, "thing": _Opaque()}, path)
    return path


def test_cli_bad_colorcnn_checkpoints_are_one_line(tmp_path, capsys):
    image = _png(tmp_path / "pic.png")
    classifier = tmp_path / "classifier.pt"
    save_classifier(CifarAlexNet(), classifier, "alexnet", 10, 32)
    bad = {"no-config": _colorcnn_ckpt(tmp_path / "no-config.pt", config=None),
           "pickled": _pickled_code_file(tmp_path / "pickled.pt", COLORCNN_FORMAT),
           "wrong-weights": _colorcnn_ckpt(tmp_path / "w.pt", state_dict={"x": torch.zeros(1)})}
    for name, path in bad.items():
        line = _error(capsys, "quantize", image, "--method", "colorcnn", "--colorcnn", path, "-o", tmp_path / "q")
        assert str(path) in line, (name, line)
        line = _error(capsys, "train", "--classifier", classifier, "--init-from", path, "--device", "cpu",
                      "--width", "4", "--out-dir", tmp_path / "t", "--no-progress")
        assert str(path) in line, (name, line)
    line = _error(capsys, "train", "--classifier", _pickled_code_file(tmp_path / "pc.pt", CLASSIFIER_FORMAT),
                  "--device", "cpu", "--out-dir", tmp_path / "t", "--no-progress")
    assert "pc.pt is not a classifier checkpoint (cannot read it: UnpicklingError" in line
    assert not (tmp_path / "q").exists() and not (tmp_path / "t").exists()


@needs_cifar
def test_cli_bad_colorcnn_checkpoint_in_evaluate_and_resume(tmp_path, capsys):
    classifier = tmp_path / "classifier.pt"
    save_classifier(CifarAlexNet(), classifier, "alexnet", 10, 32)
    path = _colorcnn_ckpt(tmp_path / "no-config.pt", config=None)
    line = _error(capsys, "evaluate", "--classifier", classifier, "--colorcnn", path, "--methods", "colorcnn",
                  "--num-colors", "2", "--device", "cpu", "--out-dir", tmp_path / "e", "--no-progress")
    assert f"{path} is not a ColorCNN checkpoint (missing entries ['config'])" in line
    run = tmp_path / "run"
    run.mkdir()
    _pickled_code_file(run / "last.pt", "x")
    line = _error(capsys, "train-classifier", *COMMON, "--cache-dir", tmp_path / "cache", "--out-dir", run,
                  "--resume")
    assert f"cannot read the resume checkpoint {run / 'last.pt'}: UnpicklingError" in line


# --- 11-12: archives and annotation files ------------------------------------------------------


def _tar(path: Path, *members) -> Path:
    """A .tar.gz of ``(TarInfo, bytes or None)`` members."""
    with tarfile.open(path, "w:gz") as tf:
        for info, payload in members:
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _member(name, kind=tarfile.REGTYPE, mode=0o644, linkname="", payload=b"x"):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname = kind, mode, linkname
    return info, (payload if kind == tarfile.REGTYPE else None)


@pytest.mark.parametrize("member", [
    _member("train/evil", tarfile.SYMTYPE, linkname="/etc"),
    _member("train/up", tarfile.SYMTYPE, linkname="../../outside"),
    _member("train/hard", tarfile.LNKTYPE, linkname="/etc/hostname"),
    _member("../escape.txt"),
    _member("train/dev", tarfile.CHRTYPE),
    _member("train/fifo", tarfile.FIFOTYPE),
], ids=["symlink-absolute", "symlink-up", "hardlink-outside", "dotdot", "device", "fifo"])
def test_archive_extraction_refuses_links_and_special_files(tmp_path, member):
    archive = _tar(tmp_path / "a.tar.gz", _member("train/ok.txt"), member)
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing to extract it"):
        archives._untar(archive, dest)
    assert not (tmp_path / "box" / "escape.txt").exists() and not (tmp_path / "box" / "outside").exists()
    for path in dest.rglob("*"):
        assert path.is_dir() or (path.is_file() and not path.is_symlink()), path


def test_archive_extraction_keeps_absolute_names_inside(tmp_path):
    name = f"/tmp/colorquant-test-{os.getpid()}/absolute.txt"
    archive = _tar(tmp_path / "a.tar.gz", _member(name))
    dest = tmp_path / "dest"
    dest.mkdir()
    archives._untar(archive, dest)
    assert not Path(name).exists() and (dest / name.lstrip("/")).read_bytes() == b"x"


def test_archive_extraction_drops_setuid_bits_on_every_path(tmp_path, monkeypatch):
    archive = _tar(tmp_path / "a.tar.gz", _member("train/run.sh", mode=0o6777), _member("test/x.txt"))
    dest = tmp_path / "dest"
    dest.mkdir()
    archives._untar(archive, dest)
    mode = (dest / "train" / "run.sh").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH)
    # through extract_cifar10_jpeg with the checksum check bypassed: the same rules
    evil = _tar(tmp_path / "evil.tar.gz", _member("train/link", tarfile.SYMTYPE, linkname="/etc"))
    monkeypatch.setattr(archives, "CIFAR10_JPEG_SHA256", archives._sha256(evil))
    with pytest.raises(ValueError, match="refusing to extract it"):
        archives.extract_cifar10_jpeg(evil, tmp_path / "cache" / "cifar10-jpeg")
    assert not any((tmp_path / "cache").rglob("link"))


def _tiny_root(tmp_path: Path, entry: str) -> Path:
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{k:08d}" for k in range(200)]
    for wnid in wnids:
        (root / "train" / wnid / "images").mkdir(parents=True)
    _png(root / "train" / wnids[0] / "images" / "a.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    _png(root / "val" / "images" / "val_0.JPEG")
    (root / "val" / "val_annotations.txt").write_text(f"val_0.JPEG\t{wnids[0]}\t0\t0\t1\t1\n{entry}\t{wnids[1]}\t0\t0\t1\t1\n")
    return root


@pytest.mark.parametrize("entry", ["../../secret.JPEG", "/etc/passwd", "images/../../x.JPEG", ".."])
def test_tiny_imagenet_annotations_stay_inside_the_data_root(tmp_path, entry):
    _png(tmp_path / "secret.JPEG")
    _tiny_root(tmp_path, entry)
    with pytest.raises(ValueError, match=r"val_annotations.txt:2: .* is not a file name in"):
        data.build_dataset("tiny200", tmp_path, "test")


# --- 17: the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "cuda:99", "bogus"])
def test_cli_bad_devices_are_one_line(tmp_path, capsys, device):
    image = _png(tmp_path / "pic.png")
    assert "--device" in _error(capsys, "quantize", image, "--num-colors", "2", "--device", device,
                                "-o", tmp_path / "q")
    assert "--device" in _error(capsys, "train-classifier", *COMMON, "--device", device, "--out-dir", tmp_path / "r")
    assert not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


@needs_cifar
def test_cli_diverging_run_is_one_line(tmp_path, capsys):
    line = _error(capsys, "train-classifier", *COMMON, "--epochs", "1", "--lr", "nan", "--cache-dir",
                  tmp_path / "cache", "--out-dir", tmp_path / "run")
    assert "the training loss of epoch 1 is not finite" in line


def test_cli_demo_rebuild_assets_on_unreadable_checkpoints(tmp_path, capsys):
    from colorquant_ops.experiment import demo

    for name in ("classifier", "colorcnn-k2-gumbel", "colorcnn-k4-gumbel", "colorcnn-k8-gumbel",
                 "colorcnn-k2-compact-gumbel", "colorcnn-plus-gumbel"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "final.pt").write_bytes(b"truncated")
    before = {p: p.read_bytes() for p in demo.WEIGHTS.glob("*.pt")}
    line = _error(capsys, "demo", "--rebuild-assets", tmp_path)
    assert f"{tmp_path / 'classifier' / 'final.pt'} is not a classifier checkpoint" in line
    assert {p: p.read_bytes() for p in demo.WEIGHTS.glob("*.pt")} == before


def test_cli_missing_data_root_is_short(tmp_path, capsys):
    try:
        status = cli.main(["train-classifier", *COMMON, "--dataset", "cifar100", "--data-root",
                           str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "run")])
    finally:
        err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    first, *rest = err.strip().splitlines()
    assert first == f"colorquant: error: CIFAR-100 not found under data_root={tmp_path / 'nothing'} (it does not exist)"
    assert len(rest) == 1 and rest[0].startswith("  looked for: ") and str(tmp_path / "nothing" / "cifar100") in rest[0]
