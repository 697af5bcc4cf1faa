"""Dataset layer (colorquant_ops.experiment.data): the JPEG copy of CIFAR-10, build_dataset, transforms, tensor cache.

The CIFAR-10 tests use ../shared/data/cifar10-jpeg.tar.gz extracted by extract_cifar10_jpeg (once per
checkout into the git-ignored .cache/, see ``cifar_root``; the extraction logic itself is also tested
on a small synthetic archive); without the archive they are skipped with a visible reason. Nothing here
touches the network: the ``no_network`` fixture makes any socket connection or torchvision
download raise.
"""

import hashlib
import os
import socket
import tarfile
import time
import urllib.error
from pathlib import Path

import PIL.Image
import pytest
import torch
import torchvision.datasets.cifar
import torchvision.datasets.stl10
import torchvision.datasets.utils
from torchvision import tv_tensors
from torchvision.transforms.functional import pil_to_tensor

from colorquant_ops.experiment import data
from colorquant_ops.experiment.data import CIFAR10_CLASSES, DatasetNotFoundError

ARCHIVE = data.find_shared_cifar10_archive()
needs_archive = pytest.mark.skipif(
    ARCHIVE is None,
    reason="CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found (looked at "
    + ", ".join(str(p) for p in data.archives.shared_archive_candidates())
    + ")",
)


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory):
    """The real archive, extracted by extract_cifar10_jpeg.

    By default into the git-ignored <repo>/.cache/cifar10-jpeg: extracted once per checkout (about
    3 s, but creating 60,000 files took 25 s on a busy machine), later sessions find its marker and
    reuse it. COLORQUANT_TEST_FRESH_EXTRACT=1 extracts into a fresh temporary directory instead.
    """
    if ARCHIVE is None:
        pytest.skip("CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found")
    dest = None
    if os.environ.get("COLORQUANT_TEST_FRESH_EXTRACT") == "1":
        dest = tmp_path_factory.mktemp("cache") / "cifar10-jpeg"
    return data.extract_cifar10_jpeg(ARCHIVE, dest)


@pytest.fixture(scope="session")
def cifar_train(cifar_root):
    return data.build_dataset("cifar10", cifar_root, "train")


@pytest.fixture(scope="session")
def cifar_test(cifar_root):
    return data.build_dataset("cifar10", cifar_root, "test")


def _refuse(*args, **kwargs):
    raise AssertionError("a test attempted network access / a download")


@pytest.fixture
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    for module in (torchvision.datasets.utils, torchvision.datasets.cifar, torchvision.datasets.stl10):
        for fn in ("download_url", "download_and_extract_archive"):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, _refuse)


def _save_jpeg(path: Path, size, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new("RGB", size, color).save(path)


# --- the JPEG copy of CIFAR-10 -----------------------------------------------------------------


@needs_archive
def test_extraction_layout_and_class_order(cifar_root):
    assert (cifar_root / ".extracted").is_file()
    for split in ("train", "test"):
        folders = sorted(e.name for e in os.scandir(cifar_root / split) if e.is_dir())
        assert tuple(folders) == CIFAR10_CLASSES
    # torchvision's CIFAR10 label order (batches.meta), which ImageFolder's sorted order must equal
    assert CIFAR10_CLASSES == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@needs_archive
def test_file_counts(cifar_root, cifar_train, cifar_test):
    for split, per_class in (("train", 5000), ("test", 1000)):
        for cls in CIFAR10_CLASSES:
            assert sum(1 for e in os.scandir(cifar_root / split / cls) if e.name.endswith(".jpg")) == per_class
    assert len(cifar_train) == 50_000 and len(cifar_test) == 10_000
    assert cifar_train.classes == list(CIFAR10_CLASSES) == cifar_test.classes
    assert torch.bincount(torch.tensor(cifar_test.targets)).tolist() == [1000] * 10


@needs_archive
def test_extraction_is_idempotent(cifar_root, monkeypatch):
    # with the marker present, nothing is re-extracted and the archive is not even needed
    monkeypatch.setattr(data.archives, "_untar", _refuse)
    start = time.perf_counter()
    assert data.extract_cifar10_jpeg(cifar_root.parent / "no-such-archive.tar.gz", cifar_root) == cifar_root
    assert time.perf_counter() - start < 1.0


def _fake_archive(tmp_path, classes=CIFAR10_CLASSES) -> Path:
    """A small archive with CIFAR-10's layout (one image per class and split)."""
    src = tmp_path / "src"
    for split in ("train", "test"):
        for k, cls in enumerate(classes):
            _save_jpeg(src / split / cls / "0000.jpg", (32, 32), (k * 25, 0, 0))
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src / "train", "train")
        tf.add(src / "test", "test")
    return archive


def test_extraction_logic_on_a_small_archive(tmp_path, monkeypatch):
    archive = _fake_archive(tmp_path)
    monkeypatch.setattr(data.archives, "CIFAR10_JPEG_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    dest = tmp_path / "cache" / "cifar10-jpeg"
    assert data.extract_cifar10_jpeg(archive, dest) == dest
    assert (dest / ".extracted").read_text().strip() == data.archives.CIFAR10_JPEG_SHA256
    assert len(list(dest.glob("*/*/*.jpg"))) == 20
    assert [p.name for p in dest.parent.iterdir()] == ["cifar10-jpeg"]  # no partial directory left
    assert data.build_dataset("cifar10", dest, "test")[3][1] == 3

    monkeypatch.setattr(data.archives, "_untar", _refuse)  # marker present: nothing re-extracted, archive not needed
    assert data.extract_cifar10_jpeg(tmp_path / "gone.tar.gz", dest) == dest
    monkeypatch.undo()

    # an interrupted extraction (no marker) is completed in place
    monkeypatch.setattr(data.archives, "CIFAR10_JPEG_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    (dest / ".extracted").unlink()
    (dest / "test" / "cat" / "0000.jpg").unlink()
    data.extract_cifar10_jpeg(archive, dest)
    assert (dest / "test" / "cat" / "0000.jpg").is_file() and (dest / ".extracted").is_file()


def test_extraction_checks_sha256_and_layout(tmp_path, monkeypatch):
    fake = tmp_path / "cifar10-jpeg.tar.gz"
    fake.write_bytes(b"not the archive")
    with pytest.raises(ValueError, match="sha256"):
        data.extract_cifar10_jpeg(fake, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        data.extract_cifar10_jpeg(tmp_path / "missing.tar.gz", tmp_path / "out")
    wrong = _fake_archive(tmp_path, classes=CIFAR10_CLASSES[:9])
    monkeypatch.setattr(data.archives, "CIFAR10_JPEG_SHA256", hashlib.sha256(wrong.read_bytes()).hexdigest())
    with pytest.raises(RuntimeError, match="class folders"):
        data.extract_cifar10_jpeg(wrong, tmp_path / "cache" / "out")
    assert list((tmp_path / "cache").iterdir()) == []  # the partial extraction is removed


def test_find_shared_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(data.archives, "REPO_ROOT", tmp_path / "elsewhere" / "repo")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert data.find_shared_cifar10_archive() is None
    with pytest.raises(DatasetNotFoundError) as info:
        data.extract_cifar10_jpeg(cache_dir=tmp_path / "out")
    assert str(tmp_path / "elsewhere" / "shared" / "data" / "cifar10-jpeg.tar.gz") in str(info.value)
    archive = tmp_path / "shared" / "data" / "cifar10-jpeg.tar.gz"  # ../shared/data from the cwd
    archive.parent.mkdir(parents=True)
    archive.write_bytes(b"")
    assert data.find_shared_cifar10_archive() == archive.resolve()


# --- build_dataset on the ImageFolder layout ---------------------------------------------------


@needs_archive
def test_sample_has_label_of_its_class_folder(cifar_test):
    index = next(i for i, (path, _) in enumerate(cifar_test.samples) if Path(path).parent.name == "cat")
    image, label = cifar_test[index]
    assert isinstance(image, PIL.Image.Image) and image.size == (32, 32) and image.mode == "RGB"
    assert isinstance(label, int) and label == CIFAR10_CLASSES.index("cat") == 3


@needs_archive
def test_subset_is_deterministic_and_class_balanced(cifar_root, cifar_test):
    a = data.build_dataset("cifar10", cifar_root, "test", subset=300, seed=0)
    b = data.build_dataset("cifar10", cifar_root, "test", subset=300, seed=0)
    c = data.build_dataset("cifar10", cifar_root, "test", subset=300, seed=1)
    small = data.build_dataset("cifar10", cifar_root, "test", subset=25, seed=0)
    assert len(a) == 300 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 300
    assert small.indices == a.indices[:25]  # a smaller subset is a prefix of a larger one
    assert torch.bincount(torch.tensor(a.targets), minlength=10).tolist() == [30] * 10
    assert set(small.targets) == set(range(10))
    assert a.classes == list(CIFAR10_CLASSES)
    assert a.targets == [cifar_test.targets[i] for i in a.indices]
    _, label = a[0]
    assert label == a.targets[0]
    with pytest.raises(ValueError, match="subset"):
        data.build_dataset("cifar10", cifar_root, "test", subset=10_001)


def test_balanced_order_uneven_classes():
    targets = [0] * 50 + [1] * 5 + [2] * 20
    order = data.balanced_order(targets, seed=3)
    assert sorted(order.tolist()) == list(range(75))
    first = [targets[i] for i in order[:15].tolist()]
    assert sorted(first) == [0] * 5 + [1] * 5 + [2] * 5
    assert torch.equal(order, data.balanced_order(targets, seed=3))


@needs_archive
def test_cifar_transforms_shape_and_normalized_mean(cifar_root):
    train = data.build_dataset(
        "cifar10", cifar_root, "train", transform=data.train_transform("cifar10"), subset=50, seed=2
    )
    x, _ = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    test = data.build_dataset("cifar10", cifar_root, "test", transform=data.test_transform("cifar10"), subset=300)
    batch = torch.stack([test[i][0] for i in range(len(test))])
    assert batch.shape == (300, 3, 32, 32)
    mean = batch.mean(dim=(0, 2, 3))
    assert mean.abs().max() < 0.15, mean  # CIFAR mean subtracted
    # the paper's std (0.2023, 0.1994, 0.2010) is below the per-pixel std: normalized std is ~1.2
    std = batch.std(dim=(0, 2, 3))
    assert ((std > 1.0) & (std < 1.4)).all(), std
    unnormalized = data.test_transform("cifar10", normalize=False)
    raw = data.build_dataset("cifar10", cifar_root, "test", transform=unnormalized, subset=20)
    y, _ = raw[0]
    assert y.min() >= 0 and y.max() <= 1


# --- transforms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, size_in, size_out",
    [("cifar10", (32, 32), 32), ("cifar100", (32, 32), 32), ("stl10", (96, 96), 96), ("tiny200", (64, 64), 64),
     ("imagefolder", (300, 260), 224)],
)
def test_transform_shapes(name, size_in, size_out):
    mean, std, image_size, num_classes = data.DATASET_STATS[name]
    assert image_size == size_out and len(mean) == len(std) == 3
    image = PIL.Image.new("RGB", size_in, (200, 100, 50))
    for make in (data.train_transform, data.test_transform):
        out = make(name)(image)
        assert out.shape == (3, size_out, size_out) and out.dtype == torch.float32
        # uint8 tensors (TensorImageDataset) go through the same pipelines
        assert make(name)(torch.full((3, size_in[1], size_in[0]), 128, dtype=torch.uint8)).shape == out.shape
    expected = torch.tensor([200 / 255, 100 / 255, 50 / 255]).sub(torch.tensor(mean)).div(torch.tensor(std))
    torch.testing.assert_close(data.test_transform(name)(image)[:, 5, 5], expected)


def test_transform_stats_and_image_size():
    assert data.DATASET_STATS["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), 32, 10)
    assert data.DATASET_STATS["cifar100"].num_classes == 100
    # STL-10 as the authors normalize it: ImageNet statistics
    assert data.DATASET_STATS["stl10"][:3] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 96)
    assert data.DATASET_STATS["tiny200"] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 64, 200)
    image = PIL.Image.new("RGB", (150, 120))
    assert data.test_transform("imagefolder", image_size=112)(image).shape == (3, 112, 112)
    assert data.train_transform("imagefolder", image_size=112)(image).shape == (3, 112, 112)
    with pytest.raises(ValueError, match="image_size"):
        data.train_transform("cifar10", image_size=64)


@pytest.mark.parametrize("name", data.DATASETS)
def test_denormalize_inverts_normalize(name):
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = data.normalize(name)(x)
    assert not torch.allclose(y, x)
    torch.testing.assert_close(data.denormalize(name)(y), x, atol=1e-6, rtol=0)
    image = tv_tensors.Image(x[0])
    back = data.denormalize(name, clamp=True)(data.normalize(name)(image))
    assert isinstance(back, tv_tensors.Image)
    torch.testing.assert_close(back.as_subclass(torch.Tensor), x[0], atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="floating"):
        data.denormalize(name)(torch.zeros(3, 2, 2, dtype=torch.uint8))


# --- errors --------------------------------------------------------------------------------------


def test_missing_cifar10_names_paths_and_remedy(tmp_path, no_network):
    with pytest.raises(DatasetNotFoundError) as info:
        data.build_dataset("cifar10", tmp_path, "train")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    message = str(err)
    expected = [tmp_path / "cifar10" / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py",
                tmp_path / "cifar10" / "train", tmp_path / "train"]
    assert set(expected) <= set(err.paths)
    for path in err.paths:
        assert str(path) in message
    assert "download=True" in message and "network" in message
    assert "cifar10-jpeg.tar.gz" in message and str(tmp_path / "cifar10") in message
    assert "Traceback" not in message and err.__cause__ is None


@pytest.mark.parametrize("name", ["cifar100", "stl10", "tiny200", "imagefolder"])
def test_missing_other_datasets(tmp_path, no_network, name):
    with pytest.raises(DatasetNotFoundError) as info:
        data.build_dataset(name, tmp_path / "nothing", "test")
    assert info.value.paths and all(str(p) in str(info.value) for p in info.value.paths)
    assert "does not exist" in str(info.value) and "To supply it" in str(info.value)


def test_failed_download_is_one_clear_error(tmp_path, no_network, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        data.build_dataset("cifar10", tmp_path, "train", download=True)
    assert "URLError" in str(info.value) and "download" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_corrupted_torchvision_release(tmp_path, no_network):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DatasetNotFoundError, match="integrity"):
        data.build_dataset("cifar10", tmp_path, "test")


def test_unknown_name_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError) as info:
        data.build_dataset("mnist", tmp_path)
    for name in data.DATASETS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="known datasets"):
        data.train_transform("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.build_dataset("cifar10", tmp_path, "validation")
    with pytest.raises(ValueError, match="subset"):
        data.build_dataset("cifar10", tmp_path, subset=0)


def test_wrong_class_folders(tmp_path):
    for cls in ("a", "b"):
        _save_jpeg(tmp_path / "cifar10" / "test" / cls / "0.jpg", (32, 32), (0, 0, 0))
    with pytest.raises(ValueError, match="classes"):
        data.build_dataset("cifar10", tmp_path, "test")


# --- other layouts (synthetic) ---------------------------------------------------------------------


def test_imagefolder_layout(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for k, cls in enumerate(("cats", "dogs")):
            for i in range(n):
                _save_jpeg(tmp_path / split / cls / f"{i}.jpg", (40, 30), (k * 255, 0, 0))
    train = data.build_dataset("imagefolder", tmp_path, "train")
    test = data.build_dataset("imagefolder", tmp_path, "test")  # falls back to val/
    assert len(train) == 6 and len(test) == 4 and test.classes == ["cats", "dogs"]
    image, label = test[3]
    assert label == 1 and image.getpixel((0, 0))[0] > 200
    x, _ = data.build_dataset("imagefolder", tmp_path, "val", transform=data.test_transform("imagefolder"))[0]
    assert x.shape == (3, 224, 224)


@pytest.mark.parametrize("rearranged", [False, True], ids=["val_annotations", "val_by_wnid"])
def test_tiny200_layouts(tmp_path, rearranged):
    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{k:08d}" for k in range(200)]
    for k, wnid in enumerate(wnids[:2]):
        _save_jpeg(root / "train" / wnid / "images" / f"{wnid}_0.JPEG", (64, 64), (k * 200, 0, 0))
    for wnid in wnids[2:]:
        (root / "train" / wnid / "images").mkdir(parents=True)
    lines = []
    for i, k in enumerate((1, 0, 1)):
        if rearranged:
            _save_jpeg(root / "val" / wnids[k] / f"val_{i}.JPEG", (64, 64), (k * 200, 0, 0))
        else:
            _save_jpeg(root / "val" / "images" / f"val_{i}.JPEG", (64, 64), (k * 200, 0, 0))
            lines.append(f"val_{i}.JPEG\t{wnids[k]}\t0\t0\t63\t63")
    if not rearranged:
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    train = data.build_dataset("tiny200", tmp_path, "train")
    val = data.build_dataset("tiny200", tmp_path, "test", transform=data.test_transform("tiny200"))
    assert len(train) == 2 and len(train.classes) == 200 and train.classes == val.classes
    assert sorted(val.targets) == [0, 1, 1]
    for i in range(3):
        x, label = val[i]
        assert x.shape == (3, 64, 64)
        assert (x[0, 0, 0] > 0) == (label == 1)  # red channel encodes the class


# --- tensor cache --------------------------------------------------------------------------------


@needs_archive
def test_tensor_cache_round_trip(cifar_root, tmp_path, monkeypatch):
    reference = data.build_dataset("cifar10", cifar_root, "test", subset=300, seed=5)
    cached = data.build_dataset("cifar10", cifar_root, "test", subset=300, seed=5, cache_dir=tmp_path)
    assert isinstance(cached, data.TensorImageDataset)
    files = list(tmp_path.glob("cifar10-test-n300-seed5-*.pt"))
    assert len(files) == 1
    assert cached.images.shape == (300, 3, 32, 32) and cached.images.dtype == torch.uint8
    assert cached.labels.dtype == torch.int64 and cached.targets == reference.targets
    assert cached.classes == list(CIFAR10_CLASSES)
    for i in (0, 123, 299):
        image, label = reference[i]
        assert torch.equal(cached.images[i], pil_to_tensor(image))
        assert cached[i][1] == label

    # second load: read from the file, no JPEG decoding at all
    monkeypatch.setattr(data.datasets, "_pil_rgb", _refuse)
    again = data.build_dataset(
        "cifar10", cifar_root, "test", transform=data.train_transform("cifar10"), subset=300, seed=5, cache_dir=tmp_path
    )
    assert torch.equal(again.images, cached.images) and torch.equal(again.labels, cached.labels)
    x, _ = again[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32


@needs_archive
def test_tensor_cache_second_load_is_faster(cifar_root, tmp_path):
    subset = data.build_dataset("cifar10", cifar_root, "train", subset=400, seed=1)
    start = time.perf_counter()
    data.cache_as_tensors(subset, tmp_path / "c.pt", progress=False)
    decode = time.perf_counter() - start
    start = time.perf_counter()
    data.cache_as_tensors(subset, tmp_path / "c.pt", progress=False)
    load = time.perf_counter() - start
    assert load < decode, (load, decode)


def test_cache_as_tensors_checks(tmp_path):
    images = torch.randint(0, 256, (6, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    source = data.TensorImageDataset(images, torch.arange(6) % 2, classes=["x", "y"])
    path = tmp_path / "c.pt"
    out = data.cache_as_tensors(source, path, progress=False)
    assert torch.equal(out.images, images) and out.targets == [0, 1, 0, 1, 0, 1] and out.classes == ["x", "y"]
    # a stale file (different length) is rebuilt
    shorter = data.TensorImageDataset(images[:4], torch.zeros(4, dtype=torch.int64))
    with pytest.warns(UserWarning, match="decoding it again"):
        assert len(data.cache_as_tensors(shorter, path, progress=False)) == 4
    # transformed (float) samples cannot be cached; images of different sizes neither
    floats = data.TensorImageDataset(images, torch.zeros(6, dtype=torch.int64), transform=lambda x: x.float())
    with pytest.raises(TypeError, match="transform=None"):
        data.cache_as_tensors(floats, tmp_path / "f.pt", progress=False)
    mixed = [(torch.zeros(3, 4, 4, dtype=torch.uint8), 0), (torch.zeros(3, 5, 5, dtype=torch.uint8), 1)]
    with pytest.raises(ValueError, match="one size"):
        data.cache_as_tensors(mixed, tmp_path / "m.pt", progress=False)
    assert not (tmp_path / "f.pt").exists() and not (tmp_path / "m.pt").exists()
