"""Tests of colorquant_ops.models.classifiers: the CIFAR-sized AlexNet / VGG16-bn /
ResNet18 of the paper's code, torchvision models by name (never with
pretrained weights), and the checkpoint helpers. CPU only, small inputs."""

import pytest
import torch
from torch import nn

from colorquant_ops.models.classifiers import (
    CLASSIFIER_ARCHS,
    CifarAlexNet,
    CifarVGG,
    build_classifier,
    load_classifier,
    save_classifier,
)
from colorquant_ops.models import ColorCNN, save_colorcnn


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # One intra-op thread: these small models run ~100x slower with 2 OpenMP
    # threads on a CPU shared with other work (threads spin at barriers).
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", CLASSIFIER_ARCHS)
def test_cifar_archs_shapes(arch):
    model = build_classifier(arch, num_classes=10, image_size=32)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


def test_cifar_versions_are_picked_up_to_64():
    assert isinstance(build_classifier("alexnet", 10), CifarAlexNet)
    assert isinstance(build_classifier("vgg16", 200, image_size=64), CifarVGG)
    resnet = build_classifier("resnet18", 10, image_size=64)
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, nn.Identity)
    # above 64: torchvision's ImageNet-style ResNet18 (7x7 stride-2 stem, max-pool)
    tv = build_classifier("resnet18", 10, image_size=96)
    assert tv.conv1.kernel_size == (7, 7) and isinstance(tv.maxpool, nn.MaxPool2d)


def test_cifar_alexnet_layers_and_param_count():
    model = CifarAlexNet(10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert convs[0].stride == (2, 2) and all(c.stride == (1, 1) for c in convs[1:])
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 3
    expected = (
        (3 * 64 * 9 + 64)
        + (64 * 192 * 9 + 192)
        + (192 * 384 * 9 + 384)
        + (384 * 256 * 9 + 256)
        + (256 * 256 * 9 + 256)
        + (256 * 10 + 10)
    )
    assert _n_params(model) == expected == 2_254_154


def test_cifar_vgg_and_resnet_param_counts():
    # VGG16-bn CIFAR: 13 convs + 13 BN + Linear(512, 10); ResNet18 CIFAR: the usual ~11.17 M.
    assert _n_params(CifarVGG(10)) == 14_728_266
    assert _n_params(build_classifier("resnet18", 10)) == 11_173_962


@pytest.mark.parametrize("size", [16, 48])
def test_cifar_archs_other_sizes(size):
    for arch in CLASSIFIER_ARCHS:
        model = build_classifier(arch, 5, image_size=64).eval()
        with torch.no_grad():
            assert model(torch.randn(1, 3, size, size)).shape == (1, 5)


def test_torchvision_model_by_name():
    model = build_classifier("mobilenet_v3_small", num_classes=7, image_size=64).eval()
    assert type(model).__name__ == "MobileNetV3"
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    model = build_classifier("resnet18", num_classes=3, image_size=96).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 96, 96)).shape == (2, 3)


def test_bad_arch():
    with pytest.raises(ValueError, match=r"alexnet.*list_models"):
        build_classifier("not_a_model", 10)
    with pytest.raises(ValueError, match="unknown classifier arch"):
        build_classifier("fasterrcnn_resnet50_fpn", 10, image_size=224)  # detection, not classification
    with pytest.raises(TypeError):
        build_classifier(None, 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("alexnet", 0)
    with pytest.raises(ValueError, match="image_size"):
        build_classifier("alexnet", 10, image_size=0)


@pytest.mark.parametrize("arch", ["alexnet", "resnet18"])
def test_checkpoint_round_trip(tmp_path, arch):
    model = build_classifier(arch, 10, image_size=32)
    if arch == "resnet18":  # give the BN buffers non-default values
        model.train()
        with torch.no_grad():
            model(torch.randn(4, 3, 32, 32))
    model.eval()
    path = tmp_path / "clf.pt"
    save_classifier(model, path, arch, 10, 32, epoch=3, accuracy=0.5)
    loaded = load_classifier(path).eval()
    assert type(loaded) is type(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["format"] == "colorquant_ops.classifier/1"
    assert (ckpt["arch"], ckpt["num_classes"], ckpt["image_size"], ckpt["epoch"], ckpt["accuracy"]) == (
        arch,
        10,
        32,
        3,
        0.5,
    )


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_classifier(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="is not a classifier checkpoint"):
        load_classifier(junk)
    other = tmp_path / "dict.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="is not a classifier checkpoint"):
        load_classifier(other)
    colorcnn = tmp_path / "colorcnn.pt"
    save_colorcnn(ColorCNN(2, width=1), colorcnn)
    with pytest.raises(ValueError, match="is not a classifier checkpoint"):
        load_classifier(colorcnn)
    # weights that do not fit the recorded architecture
    mismatched = tmp_path / "mismatched.pt"
    save_classifier(CifarAlexNet(10), mismatched, "alexnet", 100, 32)
    with pytest.raises(ValueError, match="do not fit"):
        load_classifier(mismatched)
    with pytest.raises(ValueError, match="reserved"):
        save_classifier(CifarAlexNet(10), tmp_path / "x.pt", "alexnet", 10, 32, state_dict={})
