"""Multi-process training (``colorquant_ops.experiment.distributed`` and the training engine under torchrun), on
the CPU with gloo and two processes.

* DDP's averaged gradient equals the one-process gradient of the same global batch: the CIFAR
  AlexNet (no batch norm), and ColorCNN (U-Net with batch norm) with ``sync_bn`` (CPUSyncBatchNorm),
  whose running statistics match too; without ``sync_bn`` ColorCNN's gradient differs (the test can
  tell). Processes: ``torch.multiprocessing.spawn`` with a ``file://`` rendezvous.
* ``torchrun --nproc-per-node 2 -m colorquant_ops train-classifier / train`` on a few real CIFAR-10
  images (the project's JPEG copy, as in test_train.py): artifacts written once by rank 0, checkpoints
  loadable in one process, test accuracy that of the whole test subset, exact ``--resume``.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from colorquant_ops.experiment import cli, data, distributed
from colorquant_ops.models.classifiers import build_classifier, load_classifier, save_classifier
from colorquant_ops.experiment.distributed import CPUSyncBatchNorm, DistributedContext
from colorquant_ops.losses import ColorCNNLoss
from colorquant_ops.models.colorcnn import ColorCNN, load_colorcnn

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
GLOBAL_BATCH = 8

HAVE_CIFAR = data.find_shared_cifar10_archive() is not None or (
    data.default_cache_dir() / "cifar10-jpeg" / ".extracted").is_file()
needs_cifar = pytest.mark.skipif(not HAVE_CIFAR, reason="CIFAR-10 JPEG archive ../shared/data/cifar10-jpeg.tar.gz not found")
needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with gloo is not available")


# --------------------------------------------------------------------------------------------
# Without processes
# --------------------------------------------------------------------------------------------


def test_shards_cover_each_image_once():
    dataset = list(range(11))
    shards = [list(distributed.shard(dataset, DistributedContext(r, 3, r, active=True))) for r in range(3)]
    assert sorted(sum(shards, [])) == dataset
    assert [len(s) for s in shards] == [4, 4, 3]
    assert distributed.shard(dataset, distributed.SINGLE) is dataset


def test_context_from_env(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.context_from_env() == distributed.SINGLE
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.context_from_env() == DistributedContext(3, 4, 1, active=True)
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="RANK / WORLD_SIZE / LOCAL_RANK are unusable"):
        distributed.context_from_env()


def test_resolve_device():
    ctx = DistributedContext(1, 2, 1, active=True)
    assert distributed.resolve_device("cpu", ctx) == torch.device("cpu")
    with pytest.raises(ValueError, match="expected cpu or cuda, got 'gpu'"):
        distributed.resolve_device("gpu", ctx)
    with pytest.raises(ValueError, match="runs on cpu \\(gloo\\) or cuda \\(nccl\\)"):
        distributed.resolve_device("meta", ctx)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="pass --device cuda"):
            distributed.resolve_device("cuda:0", ctx)
    else:
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.resolve_device("cuda", ctx)


def test_batch_size_must_divide_by_the_processes(monkeypatch, capsys, tmp_path):
    # checked from torchrun's environment before joining the process group (which would wait for peers)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "0")
    out = tmp_path / "run"
    assert cli.main(["train-classifier", "--batch-size", "128", "--device", "cpu", "--out-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "colorquant: error: --batch-size 128 is the global batch: it must divide by the number of processes (3)"
    assert not out.exists() and not dist.is_initialized()


def test_cpu_sync_batch_norm_converts_in_place_and_keeps_the_state_dict():
    torch.manual_seed(0)
    model = ColorCNN(2, "unet", width=4)
    model(torch.randn(2, 3, 16, 16))  # running statistics away from their initial values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert CPUSyncBatchNorm.convert(model) is model
    kinds = {type(m) for m in model.modules()}
    assert CPUSyncBatchNorm in kinds and not any(k is nn.BatchNorm2d for k in kinds)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    plain = ColorCNN(2, "unet", width=4)
    plain.load_state_dict(after)
    x = torch.randn(3, 3, 16, 16)
    # without a process group it is plain batch norm, in training and in evaluation
    for mode in (True, False):
        torch.testing.assert_close(model.train(mode).logits(x), plain.train(mode).logits(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Gradients: DDP on two processes vs one process on the global batch
# --------------------------------------------------------------------------------------------


def _tiny_classifier() -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 10))


def _case(name: str):
    """(model, loss(model_output, images, labels)) of a gradient case, the same in every process."""
    torch.manual_seed(0)
    if name == "alexnet":
        model = build_classifier("alexnet", 10, 32).eval()  # eval: no dropout (DDP syncs gradients anyway)
        return model, lambda out, x, y: F.cross_entropy(out, y)
    model = ColorCNN(4, "unet", width=4, color_jitter=0.0).train()  # jitter: one draw per process
    judge = _tiny_classifier().requires_grad_(False)
    criterion = ColorCNNLoss(alpha=1.0, beta=0.5, gamma=0.5)
    return model, lambda out, x, y: criterion(judge(out.quantized), y, out, x)[0]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g), torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)


CASES = {"alexnet": False, "colorcnn_sync_bn": True, "colorcnn_local_bn": False}  # name: sync_bn


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        ctx = DistributedContext(rank, WORLD, rank, active=True)
        results = {}
        x, y = _batch()
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        for name, sync_bn in CASES.items():
            model, loss_fn = _case(name.split("_")[0])
            net = distributed.wrap_model(model, ctx, torch.device("cpu"), sync_bn=sync_bn)
            loss_fn(net(x[local]), x[local], y[local]).backward()
            results[name] = {
                "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
                "buffers": {k: b.clone() for k, b in model.named_buffers()},
                "state_keys": sorted(model.state_dict()),
            }
        results["sums"] = distributed.all_reduce_sum([rank + 1.0, 10.0 * rank], ctx, torch.device("cpu"))

        def fails_on_rank_0():
            if ctx.is_main:
                raise ValueError("no data here")
            return "ran"

        try:
            distributed.main_first(fails_on_rank_0, ctx)
        except ValueError as exc:
            results["main_first"] = str(exc)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(name: str) -> tuple[dict, dict]:
    model, loss_fn = _case(name.split("_")[0])
    x, y = _batch()
    loss_fn(model(x), x, y).backward()
    return {k: p.grad for k, p in model.named_parameters()}, dict(model.named_buffers())


@needs_gloo
@pytest.mark.parametrize("name", ["alexnet", "colorcnn_sync_bn"])
def test_ddp_gradient_equals_the_global_batch_gradient(ddp_results, name):
    grads, buffers = _single_process(name)
    for rank, result in enumerate(ddp_results):
        assert result[name]["grads"].keys() == grads.keys()
        for k, g in grads.items():
            torch.testing.assert_close(result[name]["grads"][k], g, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {k}")
        for k, b in buffers.items():  # batch-norm running statistics of the global batch
            torch.testing.assert_close(result[name]["buffers"][k], b, rtol=1e-4, atol=1e-6, msg=f"rank {rank} {k}")
    if name == "colorcnn_sync_bn":  # the state_dict keys of plain batch norm: checkpoints load in one process
        assert ddp_results[0][name]["state_keys"] == sorted(ColorCNN(4, "unet", width=4).state_dict())


@needs_gloo
def test_without_sync_bn_the_batch_norm_gradient_differs(ddp_results):
    grads, _ = _single_process("colorcnn_local_bn")
    ddp = ddp_results[0]["colorcnn_local_bn"]["grads"]
    assert not all(torch.allclose(ddp[k], g, rtol=1e-4, atol=1e-6) for k, g in grads.items())


@needs_gloo
def test_collectives(ddp_results):
    for result in ddp_results:
        assert result["sums"] == [3.0, 10.0]
        assert result["main_first"] == "no data here"  # rank 0's error, raised on every rank


# --------------------------------------------------------------------------------------------
# torchrun end to end
# --------------------------------------------------------------------------------------------


COMMON = ["--test-subset", "33", "--batch-size", "32", "--device", "cpu", "--no-progress"]


def _torchrun(*argv, cache_dir) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
               "-m", "colorquant_ops", *map(str, argv), *COMMON, "--cache-dir", str(cache_dir)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tensor-cache")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, cache_dir):
    out = tmp_path_factory.mktemp("runs") / "classifier"
    # the step schedule: the resume test below shortens a run, which a one-cycle schedule does not allow
    _torchrun("train-classifier", "--subset", "64", "--epochs", "2", "--schedule", "step", "--out-dir", out,
              cache_dir=cache_dir)
    return out


@needs_gloo
@needs_cifar
def test_torchrun_classifier_run(classifier_run, cache_dir):
    run = classifier_run
    for name in ("settings.json", "log.txt", "metrics.jsonl", "last.pt", "best.pt", "final.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "settings.json").read_text())["world_size"] == WORLD
    log = (run / "log.txt").read_text()
    assert log.count("epoch 2 train_loss") == 1 and log.count("done: best test_acc") == 1  # rank 0 only
    assert f"torchrun: {WORLD} processes (gloo), 16 images of each batch of 32 per process" in log
    assert [m["epoch"] for m in _metrics(run)] == [1, 2]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == WORLD and len(state["rng_ranks"]) == WORLD
    # the ranks drew different augmentations: their RNG states differ
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])

    # the checkpoint loads in one process, and the logged accuracy is that of all 33 test images
    # (shards of 17 and 16, counts summed)
    model = load_classifier(run / "final.pt").eval()
    test_set = data.build_dataset("cifar10", data.extract_cifar10_jpeg(), "test", data.test_transform("cifar10"),
                                  subset=33, cache_dir=cache_dir)
    images = torch.stack([test_set[i][0] for i in range(33)])
    labels = torch.tensor([test_set[i][1] for i in range(33)])
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).double().mean().item()
    assert _metrics(run)[-1]["test_acc"] == pytest.approx(accuracy)


@needs_gloo
@needs_cifar
def test_torchrun_resume_is_exact(tmp_path, classifier_run, cache_dir):
    out = tmp_path / "run"
    _torchrun("train-classifier", "--subset", "64", "--epochs", "1", "--schedule", "step", "--out-dir", out,
              cache_dir=cache_dir)
    _torchrun("train-classifier", "--subset", "64", "--epochs", "2", "--schedule", "step", "--out-dir", out,
              "--resume", cache_dir=cache_dir)
    assert "resumed from" in (out / "log.txt").read_text()
    a, b = load_classifier(out / "final.pt").state_dict(), load_classifier(classifier_run / "final.pt").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if "seconds" not in k} for m in ms]  # noqa: E731
    assert strip(_metrics(out)) == strip(_metrics(classifier_run))


@needs_gloo
@needs_cifar
def test_torchrun_colorcnn_run_with_sync_bn(tmp_path, cache_dir):
    torch.manual_seed(0)
    classifier = tmp_path / "classifier.pt"
    save_classifier(build_classifier("alexnet", 10, 32), classifier, "alexnet", 10, 32, dataset="cifar10")
    out = tmp_path / "colorcnn"
    _torchrun("train", "--classifier", classifier, "--num-colors", "2", "--width", "4", "--subset", "32",
              "--epochs", "1", "--sync-bn", "--out-dir", out, cache_dir=cache_dir)
    (record,) = _metrics(out)
    assert 0 <= record["test_acc"] <= 1 and 1 <= record["test_colors"] <= 2
    model = load_colorcnn(out / "final.pt")
    assert isinstance(model, ColorCNN) and model.num_colors == 2
    assert {type(m) for m in model.modules()} >= {nn.BatchNorm2d}  # plain batch norm again
    assert json.loads((out / "settings.json").read_text())["sync_bn"] is True
