"""``colorquant quantize``: palette PNGs, the table and the sheet on small generated images (CPU),
ColorCNN with tiny untrained checkpoints, and the one-line errors."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorquant_ops import codecs
from colorquant_ops.experiment import cli, data
from colorquant_ops.models.colorcnn import ColorCNN, load_colorcnn, save_colorcnn
from colorquant_ops.quantizers.reference import psnr
from colorquant_ops.experiment.sheets import fit_to_cell, labelled_sheet
from colorquant_ops.transforms import ColorQuantize

from .helpers import generated_images

ROOT = Path(__file__).resolve().parents[1]
SIZE = (24, 20)  # H, W: not square, so that a transposed axis would show
CELL = 100  # sheet cells: 20x24 images are enlarged 4x to 80x96


def _uint8(image: torch.Tensor) -> torch.Tensor:
    return (image * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three generated images as files: two PNGs and one RGBA PNG (its alpha gets dropped)."""
    root = tmp_path_factory.mktemp("images")
    pictures = _uint8(generated_images(size=32)[:, :, : SIZE[0], : SIZE[1]])
    paths = []
    for name, picture in zip(("ramp", "discs", "stripes"), pictures):
        hwc = picture.permute(1, 2, 0).numpy()
        if name == "stripes":
            alpha = np.full(hwc.shape[:2] + (1,), 128, dtype=np.uint8)
            Image.fromarray(np.concatenate([hwc, alpha], axis=2), "RGBA").save(root / f"{name}.png")
        else:
            Image.fromarray(hwc).save(root / f"{name}.png")
        paths.append(root / f"{name}.png")
    return paths, pictures


def _rgb(path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1)


def _table(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| image ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def _check_png(path: Path, k: int, expected: torch.Tensor) -> torch.Tensor:
    """A palette PNG with k entries at the bit depth for k whose pixels are ``expected``; its index map."""
    data_ = path.read_bytes()
    with Image.open(io.BytesIO(data_)) as image:
        assert image.mode == "P"
    index_map, palette = codecs.decode_palette_png(data_)
    assert palette.shape == (k, 3) and codecs.png_bit_depth(data_) == codecs.palette_bit_depth(k)
    assert len(index_map.unique()) <= k
    assert torch.equal(palette[index_map].permute(2, 0, 1), expected)
    return index_map


def _locate(sheet: np.ndarray, block: np.ndarray) -> set:
    """Top-left corners ``(x, y)`` where ``block`` [h,w,3] appears exactly in ``sheet`` [H,W,3]."""
    h, w = block.shape[:2]
    first = block[0].tobytes()
    found = set()
    for y in range(sheet.shape[0] - h + 1):
        row = sheet[y].tobytes()
        start = row.find(first)
        while start != -1:
            if start % 3 == 0 and np.array_equal(sheet[y : y + h, start // 3 : start // 3 + w], block):
                found.add((start // 3, y))
            start = row.find(first, start + 1)
    return found


def _check_sheet(path: Path, rows: list[list[torch.Tensor]]) -> None:
    """The sheet shows ``rows`` (uint8 [3,H,W] images, enlarged to the cell) as rows, in column order."""
    with Image.open(path) as image:
        sheet = np.asarray(image.convert("RGB"))
    ys = []
    for row in rows:
        blocks = [np.asarray(fit_to_cell(img, CELL)) for img in row]
        assert blocks[0].shape == (SIZE[0] * 4, SIZE[1] * 4, 3)
        positions = [_locate(sheet, block) for block in blocks]
        # one y for the whole row, and an increasing x for the columns (identical outputs may
        # appear in several columns, so pick the leftmost match right of the previous column)
        (y,) = set.intersection(*({py for _, py in pos} for pos in positions))
        x = -1
        for column, pos in enumerate(positions):
            right_of = [px for px, py in pos if py == y and px > x]
            assert right_of, f"column {column} of a row is not on the sheet right of the column before"
            x = min(right_of)
        ys.append(y)
    assert ys == sorted(ys) and len(set(ys)) == len(ys)
    assert sheet.shape[0] >= len(rows) * SIZE[0] * 4 and sheet.shape[1] >= len(rows[0]) * SIZE[1] * 4


# --- classical methods ----------------------------------------------------------------------

METHODS = ("median_cut", "octree", "kmeans")
KS = (2, 4, 16)


def test_classic_methods(images, tmp_path, capsys):
    paths, pictures = images
    out = tmp_path / "out"
    argv = ["quantize", *map(str, paths), "--method", *METHODS, "--num-colors", *map(str, KS), "--dither", "both",
            "-o", str(out), "--cell-size", str(CELL), "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    table = _table(captured.out)
    assert len(table) == len(paths) * len(METHODS) * len(KS) * 2
    rows = {(r[0], r[1], r[2], int(r[3])): r for r in table}
    sheet_rows = []
    for path, picture in zip(paths, pictures):
        sheet_row = [picture]
        for method in METHODS:
            for k in KS:
                for dither in (False, True):
                    expected = ColorQuantize(k, method, dither=dither).quantize(picture[None]).quantized[0]
                    png = out / f"{path.stem}-{method}{'-dither' if dither else ''}-k{k}.png"
                    _check_png(png, k, expected)
                    sheet_row.append(expected)
                    row = rows[(str(path), method, "on" if dither else "off", k)]
                    size = png.stat().st_size
                    assert int(row[4]) == len(torch.unique(expected.flatten(1), dim=1).T) <= k
                    assert int(row[5]) == size
                    assert float(row[6]) == pytest.approx(8 * size / (SIZE[0] * SIZE[1]), abs=5e-4)
                    assert float(row[7]) == pytest.approx(psnr(expected / 255, picture / 255), abs=5e-3)
        sheet_rows.append(sheet_row)
    _check_sheet(out / "sheet.png", sheet_rows)
    assert len(list(out.glob("*.png"))) == len(table) + 1
    assert f"{paths[2]}: alpha channel dropped" in captured.err
    assert "alpha" not in captured.err.replace(f"{paths[2]}: alpha", "")  # only the RGBA file gets the note


def test_directory_input_and_bare_dither(images, tmp_path, capsys):
    paths, pictures = images
    (paths[0].parent / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert cli.main(["quantize", str(paths[0].parent), "--method", "octree", "--num-colors", "8", "--dither",
                     "-o", str(out), "--no-sheet", "--no-progress"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{p.stem}-octree-dither-k8.png" for p in paths)  # no sheet, no undithered output
    expected = ColorQuantize(8, "octree", dither=True).quantize(pictures[1][None]).quantized[0]
    _check_png(out / "discs-octree-dither-k8.png", 8, expected)
    assert len(_table(capsys.readouterr().out)) == len(paths)


def test_16_bit_grey_is_scaled(tmp_path, capsys):
    grey16 = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 541)  # 0 .. 64379
    Image.fromarray(grey16).save(tmp_path / "grey.png")
    with Image.open(tmp_path / "grey.png") as image:
        assert image.mode == "I;16"
    out = tmp_path / "out"
    assert cli.main(["quantize", str(tmp_path / "grey.png"), "--method", "median_cut", "--num-colors", "4",
                     "-o", str(out), "--no-sheet"]) == 0
    grey8 = torch.from_numpy(np.round(grey16 / 257).astype(np.uint8)).expand(3, 12, 10)
    _check_png(out / "grey-median_cut-k4.png", 4, ColorQuantize(4, "median_cut").quantize(grey8[None]).quantized[0])
    assert "alpha" not in capsys.readouterr().err


# --- ColorCNN -------------------------------------------------------------------------------


def _tiny_colorcnn(k: int, calibrate: torch.Tensor) -> ColorCNN:
    """An untrained ColorCNN whose BatchNorm statistics come from ``calibrate`` (one pass), so that
    it uses more than one colour (with the initial statistics every pixel gets the same index)."""
    torch.manual_seed(k)
    model = ColorCNN(k, "unet", width=4)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(calibrate)
    return model.eval()


@pytest.fixture(scope="module")
def colorcnn_checkpoints(images, tmp_path_factory):
    root = tmp_path_factory.mktemp("colorcnn")
    _, pictures = images
    normed = data.normalize("cifar10")(pictures.float() / 255)
    save_colorcnn(_tiny_colorcnn(2, normed), root / "k2.pt", dataset="cifar10")
    save_colorcnn(_tiny_colorcnn(4, normed), root / "k4-no-dataset.pt")  # as saved by hand: no dataset entry
    return root


def test_colorcnn(images, colorcnn_checkpoints, tmp_path, capsys):
    paths, pictures = images
    out = tmp_path / "out"
    argv = ["quantize", *map(str, paths[:2]), "--method", "colorcnn", "median_cut", "--dither", "both",
            "--colorcnn", str(colorcnn_checkpoints / "k2.pt"), str(colorcnn_checkpoints / "k4-no-dataset.pt"),
            "--dataset", "cifar10", "-o", str(out), "--cell-size", str(CELL), "--no-progress"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "--dither does not apply to colorcnn" in captured.err
    # no --num-colors: the checkpoints' Ks for every method; colorcnn is never dithered
    assert sorted(p.name for p in out.glob("ramp-*")) == sorted(
        ["ramp-colorcnn-k2.png", "ramp-colorcnn-k4.png"]
        + [f"ramp-median_cut{d}-k{k}.png" for k in (2, 4) for d in ("", "-dither")])
    stats = data.DATASET_STATS["cifar10"]
    sheet_rows = []
    for path, picture in zip(paths[:2], pictures):
        sheet_row = [picture]
        for k, name in ((2, "k2.pt"), (4, "k4-no-dataset.pt")):
            model = load_colorcnn(colorcnn_checkpoints / name).eval()
            if k == 4:  # records no dataset: --dataset cifar10 supplies the normalization
                assert model.input_normalization is None
                model.input_normalization = (stats.mean, stats.std)
            assert model.input_normalization == (stats.mean, stats.std)
            result = ColorQuantize(k, "colorcnn", model=model).quantize(picture[None])
            # the network saw the normalized image; the palette is the mean of the image's own pixels
            normed = data.normalize("cifar10")(picture[None].float() / 255)
            assert torch.equal(result.index_map, model.head(model.backbone(normed)).argmax(1))
            palette = result.palette[0]
            expected = palette[result.index_map[0]].permute(2, 0, 1)
            index_map = _check_png(out / f"{path.stem}-colorcnn-k{k}.png", k, expected)
            assert torch.equal(index_map, result.index_map[0])
            assert len(index_map.unique()) >= 2  # the check above is not about a one-colour image
            sheet_row.append(expected)
        for k in (2, 4):
            for dither in (False, True):
                sheet_row.append(ColorQuantize(k, "median_cut", dither=dither).quantize(picture[None]).quantized[0])
        sheet_rows.append(sheet_row)
    assert len(_table(captured.out)) == 2 * (2 + 4)
    _check_sheet(out / "sheet.png", sheet_rows)


def test_colorcnn_k_not_in_num_colors(images, colorcnn_checkpoints, tmp_path, capsys):
    paths, _ = images
    argv = ["quantize", str(paths[0]), "--method", "colorcnn", "--num-colors", "4",
            "--colorcnn", str(colorcnn_checkpoints / "k2.pt"), "-o", str(tmp_path / "out")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"colorquant: error: --colorcnn {colorcnn_checkpoints / 'k2.pt'} quantizes to 2 colours, "
                   "which is not among --num-colors 4")


def test_num_colors_without_checkpoint_is_noted(images, colorcnn_checkpoints, tmp_path, capsys):
    paths, _ = images
    out = tmp_path / "out"
    argv = ["quantize", str(paths[0]), "--method", "colorcnn", "kmeans", "--num-colors", "2", "8",
            "--colorcnn", str(colorcnn_checkpoints / "k2.pt"), "-o", str(out), "--no-sheet"]
    assert cli.main(argv) == 0
    assert "colorcnn has no K=8 output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["ramp-colorcnn-k2.png", "ramp-kmeans-k2.png",
                                                      "ramp-kmeans-k8.png"]


# --- errors ---------------------------------------------------------------------------------


def _bad_files(root: Path) -> dict:
    (root / "text.png").write_text("not an image")
    (root / "bad.pt").write_bytes(b"not a checkpoint")
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(root / "float.tif")  # PIL mode F
    (root / "empty").mkdir(exist_ok=True)
    (root / "other").mkdir(exist_ok=True)
    return {"text": root / "text.png", "bad_ckpt": root / "bad.pt", "empty": root / "empty",
            "float": root / "float.tif"}


@pytest.mark.parametrize("extra, message", [
    (["{missing}", "--num-colors", "4"], "image not found: {missing}"),
    (["{text}", "--num-colors", "4"], "{text}: not an image file PIL can read"),
    (["{empty}", "--num-colors", "4"], "{empty}: directory holds no image files"),
    (["{image}", "{float}", "--num-colors", "4"], "{float}: PIL mode F (32-bit grey) has no defined 8-bit range"),
    (["{image}", "{copy}", "--num-colors", "4"], "two inputs have the stem 'ramp'"),
    (["{image}", "--method", "bogus", "--num-colors", "4"], "--method: unknown method 'bogus'"),
    (["{image}", "--num-colors", "1"], "--num-colors: K must be in 2..256, got 1"),
    (["{image}", "--num-colors", "4", "257"], "--num-colors: K must be in 2..256, got 257"),
    (["{image}", "--method", "median_cut"], "--num-colors is required"),
    (["{image}", "--method", "colorcnn"], "--method colorcnn needs --colorcnn CKPT"),
    (["{image}", "--method", "kmeans", "--num-colors", "2", "--colorcnn", "{ckpt_k2}"],
     "--colorcnn is given but colorcnn is not among --method"),
    (["{image}", "--method", "colorcnn", "--colorcnn", "{bad_ckpt}"], "{bad_ckpt} is not a ColorCNN checkpoint"),
    (["{image}", "--method", "colorcnn", "--colorcnn", "{missing}"], "ColorCNN checkpoint not found: {missing}"),
    (["{image}", "--method", "colorcnn", "--colorcnn", "{ckpt_k4}"],
     "does not record the normalization it expects; pass --dataset"),
    (["{image}", "--method", "colorcnn", "--colorcnn", "{ckpt_k2}", "--dataset", "stl10"],
     "was trained on cifar10 images, not --dataset stl10"),
    (["{image}", "--num-colors", "4", "--dither", "sometimes"], "--dither: expected on, off or both"),
])
def test_errors_exit_2(images, colorcnn_checkpoints, tmp_path, capsys, extra, message):
    paths, _ = images
    names = {"missing": tmp_path / "missing.png", "image": paths[0], "copy": tmp_path / "other" / "ramp.jpg",
             "ckpt_k2": colorcnn_checkpoints / "k2.pt", "ckpt_k4": colorcnn_checkpoints / "k4-no-dataset.pt",
             **_bad_files(tmp_path)}
    Image.open(paths[0]).convert("RGB").save(names["copy"])
    out = tmp_path / "out"
    assert cli.main(["quantize", *(a.format(**names) for a in extra), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("colorquant: error: ") and "\n" not in err
    assert message.format(**names) in err
    if "{float}" in extra:  # a bad input is skipped: the others are processed
        assert (out / "ramp-median_cut-k4.png").is_file()
    else:
        assert not out.exists()  # nothing written


def test_real_process(images, tmp_path):
    paths, pictures = images
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "colorquant_ops", "quantize", str(paths[1]), "--method", "kmeans",
         "--num-colors", "4", "-o", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert len(_table(result.stdout)) == 1 and (out / "sheet.png").is_file()
    _check_png(out / "discs-kmeans-k4.png", 4, ColorQuantize(4, "kmeans").quantize(pictures[1][None]).quantized[0])


# --- sheet ----------------------------------------------------------------------------------


def test_fit_to_cell():
    tiny = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    enlarged = np.asarray(fit_to_cell(tiny, 30))
    assert enlarged.shape == (20, 28, 3)  # factor 4 = 30 // 7
    assert np.array_equal(enlarged, tiny.repeat_interleave(4, 1).repeat_interleave(4, 2).permute(1, 2, 0).numpy())
    assert fit_to_cell(fit_to_cell(tiny, 30), 30).size == (28, 20)  # idempotent
    large = fit_to_cell(Image.new("RGB", (300, 120), (10, 200, 30)), 100)
    assert large.size == (100, 40) and large.getcolors() == [(4000, (10, 200, 30))]  # nearest: no new colours
    assert fit_to_cell(tiny, 7).size == (7, 5)
    with pytest.raises(ValueError, match="cell_size"):
        fit_to_cell(tiny, 0)
    with pytest.raises(TypeError, match="uint8"):
        fit_to_cell(tiny.float(), 10)


def test_labelled_sheet_places_every_image():
    g = torch.Generator().manual_seed(1)
    rows = [[torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for w in (8, 16, 4)] for h in (8, 12)]
    sheet, boxes = labelled_sheet(rows, ["a", "wide column label", "c"], [["x", "y\nz", ""], ["1", "2", "3"]],
                                  cell_size=32)
    pixels = np.asarray(sheet)
    for row, row_boxes in zip(rows, boxes):
        assert len({top for _, top, _, _ in row_boxes}) == 1  # a row is aligned
        for image, box in zip(row, row_boxes):
            left, top, right, bottom = box
            assert np.array_equal(pixels[top:bottom, left:right], np.asarray(fit_to_cell(image, 32)))
    lefts = [box[0] for box in boxes[0]]
    assert lefts == sorted(lefts) and boxes[0][0][1] < boxes[1][0][1]
    assert boxes[1][2][2] <= sheet.width and boxes[1][2][3] <= sheet.height
    assert (pixels[: boxes[0][0][1]] != 255).any()  # header text above the first row
    with pytest.raises(ValueError, match="one per column label"):
        labelled_sheet(rows, ["a", "b"])
