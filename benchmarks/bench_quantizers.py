"""Traditional quantizers: images per second of a batch.

* PIL's median cut, octree and k-means, image by image (the seed paper's path,
  :func:`colorquant_ops.quantizers.pil_quantize`), without and with
  Floyd-Steinberg dithering, from uint8 images;
* the batched ops :func:`~colorquant_ops.ops.kmeans_palette` (10 Lloyd
  iterations) alone and followed by
  :func:`~colorquant_ops.ops.floyd_steinberg_dither`, on the CPU and (with
  ``--device cuda``) on the GPU, from float32 images already on the device;
* the paper's pure-Python dithering loop
  (:func:`~colorquant_ops.quantizers.reference.floyd_steinberg_batch_reference`)
  onto a given k-means palette, on a few images only: the slowest reference.

Images: real CIFAR-10 test images (the project's JPEG copy, see
:mod:`colorquant_ops.experiment.data`), batches of 128 at 32x32 and of 32 resized to
224x224 (bicubic): there is no larger real-image dataset in this project.
"""

import argparse
import dataclasses
from typing import Dict, List, Optional

import torch
from torchvision.transforms.v2 import functional as TF

from colorquant_ops.experiment import data
from colorquant_ops.ops import floyd_steinberg_dither, kmeans_palette
from colorquant_ops.quantizers import pil_quantize
from colorquant_ops.quantizers.reference import floyd_steinberg_batch_reference

from .bench_ops import SIZES
from .common import NotRun, TimingPolicy, fmt_ms, fmt_ratio, ratio, release_memory, time_calls

#: size name -> images per batch
BATCH = {"cifar": 128, "imagenet": 32}
#: images the pure-Python dithering loop is timed on (about 30 ms per CIFAR image, seconds per 224x224 one)
PYTHON_DITHER_IMAGES = {"cifar": 4, "imagenet": 1}
#: batches rotated between calls (distinct real images)
N_BATCHES = 3
#: class-balanced test subset the images come from (cached as a tensor by colorquant_ops.experiment.data)
SUBSET = 500

PIL_METHODS = (("median_cut", "PIL median cut"), ("octree", "PIL octree"), ("kmeans", "PIL k-means"))
KMEANS_ITERS = 10


@dataclasses.dataclass(frozen=True)
class QuantizerCase:
    size: str
    K: int
    method: str  #: "pil:<method>", "kmeans" (batched op) or "python_dither"
    dither: bool
    device: str

    @property
    def label(self) -> str:
        if self.method.startswith("pil:"):
            name = dict(PIL_METHODS)[self.method[4:]]
        elif self.method == "kmeans":
            name = "batched k-means op" + (" + dither op" if self.dither else "")
        else:
            name = "pure-Python dither loop (palette given)"
        return name

    @property
    def images(self) -> int:
        return PYTHON_DITHER_IMAGES[self.size] if self.method == "python_dither" else BATCH[self.size]


@dataclasses.dataclass
class QuantizerResult:
    case: QuantizerCase
    seconds: object  # float or NotRun

    @property
    def images_per_second(self) -> Optional[float]:
        return None if isinstance(self.seconds, NotRun) else self.case.images / self.seconds


def plan(sizes, device: torch.device) -> List[QuantizerCase]:
    devices = ["cpu"] + (["cuda"] if device.type == "cuda" else [])
    cases = []
    for size in sizes:
        for K in SIZES[size][3]:
            for dither in (False, True):
                cases += [QuantizerCase(size, K, f"pil:{m}", dither, "cpu") for m, _ in PIL_METHODS]
                cases += [QuantizerCase(size, K, "kmeans", dither, d) for d in devices]
            cases.append(QuantizerCase(size, K, "python_dither", True, "cpu"))
    return cases


def load_images(sizes, data_root=None) -> Dict[str, List[torch.Tensor]]:
    """``N_BATCHES`` distinct uint8 batches per size from the CIFAR-10 test set.

    Raises :class:`colorquant_ops.experiment.data.DatasetNotFoundError` (saying where it
    looked and how to supply the data) when CIFAR-10 is not there.
    """

    root, cache = data.data_locations(argparse.Namespace(data_root=data_root, dataset="cifar10", cache_dir=None))
    dataset = data.build_dataset("cifar10", root, "test", subset=SUBSET, cache_dir=cache)
    images = dataset.images  # uint8 [SUBSET, 3, 32, 32], class-balanced order
    batches = {}
    for size in sizes:
        n = BATCH[size]
        if n * N_BATCHES > len(images):
            raise ValueError(f"{N_BATCHES} batches of {n} images need more than the {len(images)} loaded")
        chunks = [images[i * n:(i + 1) * n] for i in range(N_BATCHES)]
        H = SIZES[size][1]
        if H != images.shape[-1]:
            chunks = [TF.resize(c, [H, H], interpolation=TF.InterpolationMode.BICUBIC, antialias=True) for c in chunks]
        batches[size] = chunks
    return batches


def _kmeans_fn(K, dither):
    if not dither:
        return lambda image: kmeans_palette(image, K, KMEANS_ITERS)

    def kmeans_dither(image):
        _, palette = kmeans_palette(image, K, KMEANS_ITERS)
        return floyd_steinberg_dither(image, palette), palette

    return kmeans_dither


def run_case(case: QuantizerCase, batches: Dict[str, List[torch.Tensor]], policy: TimingPolicy) -> QuantizerResult:
    uint8 = batches[case.size]
    device = torch.device(case.device)
    if case.method.startswith("pil:"):
        method = case.method[4:]
        seconds = time_calls(lambda x: pil_quantize(x, case.K, method, case.dither), [(b,) for b in uint8],
                             device, policy)
    elif case.method == "kmeans":
        images = [(b.to(device).float() / 255,) for b in uint8]
        seconds = time_calls(_kmeans_fn(case.K, case.dither), images, device, policy)
    else:
        n = case.images
        images = [b[:n].float() / 255 for b in uint8]
        # the palette is given (not timed): the k-means op's, as the dither op gets it
        inputs = [(x, kmeans_palette(x, case.K, KMEANS_ITERS).palette) for x in images]
        # one timed call after one warm-up: the loop takes seconds
        seconds = time_calls(floyd_steinberg_batch_reference, inputs, device,
                             TimingPolicy(max_repeats=1, min_repeats=1, budget_s=0.0, slow_call_s=0.0))
    release_memory(device)
    return QuantizerResult(case, seconds)


def _pil_kmeans(results: List[QuantizerResult], case: QuantizerCase) -> Optional[QuantizerResult]:
    for r in results:
        c = r.case
        if (c.size, c.K, c.method, c.dither) == (case.size, case.K, "pil:kmeans", case.dither):
            return r
    return None


def table(results: List[QuantizerResult]):
    header = ["images", "K", "method", "dither", "device", "ms / call", "images / call", "images/s",
              "vs PIL k-means (same dither)"]
    rows = []
    for r in results:
        c = r.case
        H = SIZES[c.size][1]
        base = _pil_kmeans(results, c)
        ips = r.images_per_second
        rows.append([
            f"{BATCH[c.size]}x{H}x{H}" if c.method != "python_dither" else f"{c.images}x{H}x{H}",
            c.K, c.label, "yes" if c.dither else "no", c.device, fmt_ms(r.seconds), c.images,
            "-" if ips is None else f"{ips:.3g}" if ips < 1000 else f"{ips:.0f}",
            fmt_ratio(ratio(ips, base.images_per_second if base else None)),
        ])
    return header, rows
