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


# The authors' VGG16 (color_distillation/models/vgg.py): cfg 'VGG16' = [64, 64, 'M', 128, 128, 'M', 256, 256,
# 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M']; each number Conv2d(in, x, 3, padding=1) -> BatchNorm2d(x)
# -> ReLU, each 'M' MaxPool2d(2, 2); then `self.features[-1] = nn.Sequential()` (last pool removed),
# `global_average_pooling = nn.AdaptiveAvgPool2d((1, 1))`, `classifier = nn.Linear(512, out_channel)`.
_AUTHORS_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _authors_vgg16_layers(num_classes=10):
    layers, channels = [], 3
    for x in _AUTHORS_VGG16:
        if x == "M":
            layers.append(("MaxPool2d", 2, 2))
        else:
            layers += [("Conv2d", channels, x, 3, 1, 1), ("BatchNorm2d", x), ("ReLU",)]
            channels = x
    layers[-1] = ("removed",)
    return layers + [("AdaptiveAvgPool2d", 1), ("Linear", 512, num_classes)]


def _describe(module):
    if isinstance(module, nn.Conv2d):
        return ("Conv2d", module.in_channels, module.out_channels, module.kernel_size[0], module.stride[0],
                module.padding[0])
    if isinstance(module, nn.BatchNorm2d):
        return ("BatchNorm2d", module.num_features)
    if isinstance(module, nn.ReLU):
        return ("ReLU",)
    if isinstance(module, nn.MaxPool2d):
        return ("MaxPool2d", module.kernel_size, module.stride)
    if isinstance(module, nn.Identity):
        return ("removed",)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return ("AdaptiveAvgPool2d", module.output_size if isinstance(module.output_size, int) else module.output_size[0])
    if isinstance(module, nn.Linear):
        return ("Linear", module.in_features, module.out_features)
    return (type(module).__name__,)


def test_cifar_vgg16_is_the_authors_layer_order():
    model = CifarVGG(10)
    leaves = [m for m in model.modules() if not list(m.children())]
    assert [_describe(m) for m in leaves] == _authors_vgg16_layers(10)
    # and the forward pass is theirs: features without the last pool, mean over the 2x2 map, linear
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats = model.features[:-1](x)
        assert feats.shape == (2, 512, 2, 2)
        assert torch.allclose(model(x), model.classifier(feats.mean((2, 3))), atol=1e-6)
        assert not torch.allclose(model(x), model.classifier(feats.amax((2, 3))), rtol=0, atol=1e-5)


def _bn_stats(model):
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model.eval()


def test_vgg16_checkpoints_keep_their_layout(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    new = _bn_stats(CifarVGG(10))
    save_classifier(new, tmp_path / "new.pt", "vgg16", 10, 32)
    assert torch.load(tmp_path / "new.pt", weights_only=True)["layout"] == 2
    loaded = load_classifier(tmp_path / "new.pt").eval()
    assert loaded.global_pool == "avg"
    with torch.no_grad():
        assert torch.equal(loaded(x), new(x))
    # a checkpoint from before the layout entry: trained with the global max-pool, rebuilt so
    old = _bn_stats(CifarVGG(10, global_pool="max"))
    assert isinstance(old.features[-1], nn.AdaptiveMaxPool2d)
    save_classifier(old, tmp_path / "old.pt", "vgg16", 10, 32)
    ckpt = torch.load(tmp_path / "old.pt", weights_only=True)
    assert ckpt["layout"] == 1  # a max-pool model says so
    del ckpt["layout"]
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = load_classifier(tmp_path / "old.pt").eval()
    assert loaded.global_pool == "max"
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))
        # the same weights in the average-pooling network would be another classifier
        other = CifarVGG(10)
        other.load_state_dict(ckpt["state_dict"])
        assert not torch.allclose(other.eval()(x), old(x), atol=1e-4)
    save_classifier(loaded, tmp_path / "resaved.pt", "vgg16", 10, 32)
    assert load_classifier(tmp_path / "resaved.pt").global_pool == "max"
    ckpt["layout"] = 3
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="layout 3 is newer"):
        load_classifier(tmp_path / "future.pt")
