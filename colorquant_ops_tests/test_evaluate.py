"""``colorquant evaluate`` end to end on 32 real CIFAR-10 test images (the project's JPEG copy), with a
random-init classifier and a tiny random-init ColorCNN (nothing is trained)."""

import csv
import json

import pytest
import torch

from colorquant_ops.experiment import cli, data
from colorquant_ops.models.classifiers import build_classifier, save_classifier
from colorquant_ops.models.colorcnn import ColorCNN, save_colorcnn

ARCHIVE = data.find_shared_cifar10_archive()
pytestmark = pytest.mark.skipif(
    ARCHIVE is None and not (data.default_cache_dir() / "cifar10-jpeg" / ".extracted").is_file(),
    reason="CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found",
)

METHODS = ("colorcnn", "median_cut", "kmeans")
KS = (2, 4)
QUALITIES = (10, 50)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    classifier = build_classifier("alexnet", 10, 32)
    save_classifier(classifier, root / "classifier.pt", "alexnet", 10, 32, dataset="cifar10")
    save_colorcnn(ColorCNN(2, "unet", width=4), root / "colorcnn-k2.pt")
    return root


def _common(checkpoints, tmp_path):
    return ["evaluate", "--classifier", str(checkpoints / "classifier.pt"), "--dataset", "cifar10",
            "--test-subset", "32", "--batch-size", "16", "--device", "cpu", "--no-progress",
            "--cache-dir", str(tmp_path / "cache")]


@pytest.fixture(scope="module")
def result(checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    out = tmp / "run"
    argv = [*_common(checkpoints, tmp), "--methods", *METHODS, "--dither", "both",
            "--num-colors", *map(str, KS), "--colorcnn", str(checkpoints / "colorcnn-k2.pt"),
            "--jpeg-qualities", *map(str, QUALITIES), "--out-dir", str(out)]
    assert cli.main(argv) == 0
    return out


def test_table_rows(result):
    rows = json.loads((result / "results.json").read_text())["rows"]
    keys = {(r["method"], r["dither"], r["num_colors"]) for r in rows}
    for k in KS:
        for method in ("median_cut", "kmeans"):
            for dither in ("on", "off"):
                assert (method, dither, k) in keys
        assert ("colorcnn", "off", k) in keys
    assert ("full colour", "", None) in keys
    jpeg = [r for r in rows if r["method"] == "jpeg"]
    assert [r["note"] for r in jpeg] == [f"quality {q}" for q in QUALITIES]
    assert all(r["bpp"] > 0 and 0 <= r["accuracy"] <= 1 for r in jpeg)
    full = next(r for r in rows if r["method"] == "full colour")
    assert full["bpp"] is None and 0 <= full["accuracy"] <= 1 and full["images"] == 32


def test_quantized_rows_use_at_most_k_colours(result):
    rows = json.loads((result / "results.json").read_text())["rows"]
    evaluated = [r for r in rows if r["method"] in METHODS and not r["note"]]
    assert len(evaluated) == 2 * 2 * 2 + 1  # (median_cut, kmeans) x dither x K + colorcnn K=2
    for r in evaluated:
        assert r["images"] == 32
        assert 1 <= r["colors"] <= r["num_colors"]
        assert r["bpp"] > 0
        assert 0 <= r["accuracy"] <= 1


def test_colorcnn_without_checkpoint_is_skipped(result):
    rows = json.loads((result / "results.json").read_text())["rows"]
    (row,) = [r for r in rows if r["method"] == "colorcnn" and r["num_colors"] == 4]
    assert row["note"].startswith("skipped") and row["accuracy"] is None and row["images"] == 0
    assert "colorcnn K=4 skipped" in (result / "log.txt").read_text()


def test_outputs_written(result):
    with open(result / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(json.loads((result / "results.json").read_text())["rows"])
    table = (result / "results.md").read_text()
    assert table.startswith("| method | dither | K |") and "| full colour |" in table
    assert table in (result / "log.txt").read_text()
    for name in ("accuracy_vs_bits.png", "accuracy_vs_bpp.png"):
        assert (result / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--methods", "bogus"], "unknown method 'bogus'"),
    (["--num-colors", "1"], "K must be in 2..256, got 1"),
    (["--num-colors", "257"], "K must be in 2..256, got 257"),
    (["--dither", "sometimes"], "--dither: expected on, off or both"),
    (["--plus-smoothing", "1.5"], "--plus-smoothing must be in [0, 1], got 1.5"),
])
def test_bad_arguments_exit_2(checkpoints, tmp_path, capsys, extra, message):
    argv = [*_common(checkpoints, tmp_path), "--out-dir", str(tmp_path / "run"), *extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colorquant: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("which", ["classifier", "colorcnn"])
def test_unreadable_checkpoint_exits_2(checkpoints, tmp_path, capsys, which):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    argv = [*_common(checkpoints, tmp_path), "--out-dir", str(tmp_path / "run"), "--methods", "colorcnn"]
    if which == "classifier":
        argv[argv.index("--classifier") + 1] = str(bad)
    else:
        argv += ["--colorcnn", str(bad)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colorquant: error: ") and str(bad) in err and "\n" not in err


def test_missing_checkpoint_exits_2(checkpoints, tmp_path, capsys):
    argv = [*_common(checkpoints, tmp_path), "--out-dir", str(tmp_path / "run"),
            "--colorcnn", str(tmp_path / "missing.pt")]
    assert cli.main(argv) == 2
    assert "ColorCNN checkpoint not found" in capsys.readouterr().err


class _ColourJudge(torch.nn.Module):
    """A classifier whose prediction depends on the image's mean colour: catches a wrong value space
    (e.g. a missing or doubled normalization) that a random-init network (one class for all) hides."""

    def forward(self, x):
        centres = torch.linspace(-1.5, 1.5, 10, device=x.device)
        means = x.mean(dim=(2, 3))  # [B, 3]
        score = means[:, 0:1] - 0.5 * means[:, 2:3]
        return -(score - centres).pow(2)


def test_accuracies_match_a_direct_computation(checkpoints, tmp_path, monkeypatch):
    from colorquant_ops import codecs
    from colorquant_ops.experiment import evaluate
    from colorquant_ops.models.colorcnn import load_colorcnn
    from colorquant_ops.transforms import ColorQuantize

    judge = _ColourJudge()
    monkeypatch.setattr(evaluate, "load_classifier", lambda path: judge)
    out = tmp_path / "run"
    argv = [*_common(checkpoints, tmp_path), "--methods", "colorcnn", "median_cut", "pil_kmeans", "kmeans",
            "--dither", "off", "--num-colors", "2", "--colorcnn", str(checkpoints / "colorcnn-k2.pt"), "--jpeg-qualities", "10",
            "--out-dir", str(out)]
    assert cli.main(argv) == 0
    rows = {(r["method"], r["num_colors"]): r for r in json.loads((out / "results.json").read_text())["rows"]}

    test_set = data.build_dataset("cifar10", data.extract_cifar10_jpeg(), "test",
                                  data.test_transform("cifar10", normalize=False), subset=32,
                                  cache_dir=tmp_path / "cache")
    images = torch.stack([test_set[i][0] for i in range(32)])
    labels = torch.tensor([test_set[i][1] for i in range(32)])
    norm = data.normalize("cifar10")

    def acc(x):
        return (judge(x).argmax(1) == labels).float().mean().item()

    full = acc(norm(images))
    assert len(set(judge(norm(images)).argmax(1).tolist())) > 2  # the judge is not constant
    assert rows[("full colour", None)]["accuracy"] == pytest.approx(full)
    quantized = ColorQuantize(2, "median_cut").quantize(images).quantized
    assert rows[("median_cut", 2)]["accuracy"] == pytest.approx(acc(norm(quantized)))
    # the two k-means rows, each its own algorithm: the paper's PIL quantize(kmeans=2), the library's k-means++
    from colorquant_ops import ops
    from colorquant_ops.quantizers import count_colors, pil_quantize

    paper = ops.render_index_map(*pil_quantize(images, 2, "kmeans"))
    library = ops.render_index_map(*ops.kmeans_palette(images, 2, 10, 0))
    assert not torch.equal(paper, library)
    assert rows[("pil_kmeans", 2)]["accuracy"] == pytest.approx(acc(norm(paper)))
    assert rows[("kmeans", 2)]["accuracy"] == pytest.approx(acc(norm(library)))
    assert rows[("pil_kmeans", 2)]["colors"] == pytest.approx(count_colors(paper).double().mean().item())
    model = load_colorcnn(checkpoints / "colorcnn-k2.pt").eval()
    with torch.no_grad():
        assert rows[("colorcnn", 2)]["accuracy"] == pytest.approx(acc(model(norm(images)).quantized))
    decoded, sizes = codecs.jpeg_roundtrip(images, 10, return_sizes=True)
    (jpeg,) = [r for r in rows.values() if r["method"] == "jpeg"]
    assert jpeg["accuracy"] == pytest.approx(acc(norm(decoded)))
    assert jpeg["bpp"] == pytest.approx(sizes.double().mean().item() * 8 / (32 * 32))


def test_paper_baselines_dither_as_the_authors(checkpoints, tmp_path, monkeypatch):
    # the authors' error diffusion clamps each value to the colour range: the paper's rows use it,
    # the library's k-means keeps the plain diffusion
    from colorquant_ops.experiment import evaluate
    from colorquant_ops.transforms import ColorQuantize

    judge = _ColourJudge()
    monkeypatch.setattr(evaluate, "load_classifier", lambda path: judge)
    out = tmp_path / "run"
    argv = [*_common(checkpoints, tmp_path), "--methods", "median_cut", "kmeans", "--dither", "on",
            "--num-colors", "2", "--jpeg-qualities", "--out-dir", str(out)]
    assert cli.main(argv) == 0
    rows = {r["method"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    test_set = data.build_dataset("cifar10", data.extract_cifar10_jpeg(), "test",
                                  data.test_transform("cifar10", normalize=False), subset=32,
                                  cache_dir=tmp_path / "cache")
    images = torch.stack([test_set[i][0] for i in range(32)])
    labels = torch.tensor([test_set[i][1] for i in range(32)])

    def acc(method, clamp):
        quantized = ColorQuantize(2, method, dither=True, dither_clamp=clamp)(images)
        return (judge(data.normalize("cifar10")(quantized)).argmax(1) == labels).float().mean().item()

    assert rows["median_cut"]["accuracy"] == pytest.approx(acc("median_cut", True))
    assert rows["kmeans"]["accuracy"] == pytest.approx(acc("kmeans", False))


def test_checkpoint_label():
    from colorquant_ops.experiment.arguments import checkpoint_label

    assert checkpoint_label("runs/cifar10-cpu/colorcnn-k2-compact/final.pt") == "colorcnn-k2-compact"
    assert checkpoint_label("assets/weights/colorcnn-k2-compact.pt") == "colorcnn-k2-compact"  # its bundled copy
    assert checkpoint_label("runs/x/best.pt") == "x/best" and checkpoint_label("runs/x/last.pt") == "x/last"
    assert checkpoint_label("final.pt") == "final"


def test_several_checkpoints_at_one_k_get_a_row_each(checkpoints, tmp_path, monkeypatch):
    # e.g. the bundled cifar10-k2 and cifar10-k2-compact: the first given is the plain row, the others
    # carry a variant that keeps them apart in merge_rows, the pivot tables and the plots
    import shutil

    from colorquant_ops.experiment import evaluate

    monkeypatch.setattr(evaluate, "load_classifier", lambda path: _ColourJudge())
    (tmp_path / "compact").mkdir()
    same = tmp_path / "compact" / "final.pt"
    shutil.copyfile(checkpoints / "colorcnn-k2.pt", same)  # the same weights: the same numbers
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    save_colorcnn(ColorCNN(2, "unet", width=4), other)
    out = tmp_path / "run"
    argv = [*_common(checkpoints, tmp_path), "--methods", "colorcnn", "--num-colors", "2", "4",
            "--colorcnn", str(checkpoints / "colorcnn-k2.pt"), str(same), str(other), str(same),
            "--jpeg-qualities", "--out-dir", str(out)]
    assert cli.main(argv) == 0
    rows = [r for r in json.loads((out / "results.json").read_text())["rows"] if r["method"] == "colorcnn"]
    assert [(r["num_colors"], r["variant"]) for r in rows] == [(2, ""), (2, "compact"), (2, "other"), (2, str(same)),
                                                               (4, "")]
    plain, copy, different = rows[:3]
    for key in ("accuracy", "colors", "bpp", "images"):
        assert copy[key] == plain[key] and rows[3][key] == plain[key]
    assert different["images"] == 32 and 1 <= different["colors"] <= 2
    assert len(evaluate.merge_rows([out, out])) == len(json.loads((out / "results.json").read_text())["rows"])
    pivot = evaluate.pivot_tables(rows)
    assert "| colorcnn (compact) |" in pivot and "| colorcnn (other) |" in pivot
    assert "| colorcnn (compact) | off | 2 |" in (out / "results.md").read_text()
    with open(out / "results.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f) if r["method"] == "colorcnn"][:3] == ["", "compact", "other"]


def test_merge_rows_reads_rows_from_before_variants(tmp_path):
    from colorquant_ops.experiment import evaluate

    old = {"method": "colorcnn", "dither": "off", "num_colors": 2, "bits": 1.0, "accuracy": 0.5, "colors": 2.0,
           "bpp": 1.4, "images": 10, "note": ""}  # a results.json written before rows had a variant
    (tmp_path / "results.json").write_text(json.dumps({"rows": [old, old]}))
    assert evaluate.merge_rows([tmp_path]) == [old]
    assert "| colorcnn | 50.0 |" in evaluate.pivot_tables([old])
