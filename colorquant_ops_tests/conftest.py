"""Fixtures shared by every test of colorquant_ops.

* ``device``: every op test runs on "cpu" and "cuda"; without a GPU the cuda
  variant is skipped with a visible reason (pytest -ra lists it).
* an autouse fixture poisons uninitialized memory, so that an output element a
  kernel fails to write is NaN (floats) or INT64_MAX (int64) and any comparison
  fails.
* hypothesis profiles: "ci" (default: derandomized, reproducible) and "dev"
  (more examples, random). Select with HYPOTHESIS_PROFILE=dev.
"""

import os

# Deterministic mode makes cuBLAS (bmm on CUDA tensors) raise unless this is
# set before CUDA is initialized.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.utils.deterministic  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from .helpers import CUDA_SKIP_REASON  # noqa: E402

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=100,
    derandomize=True,
    database=None,
    print_blob=True,
    # The autouse poisoning fixture is function-scoped on purpose: it is set up
    # once per test and stays valid for all of its examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=1000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
    ),
]


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return request.param


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """torch.empty (also at::empty from C++) fills floats with NaN and ints with
    their max value while a test runs; the previous settings are restored."""
    prev_enabled = torch.are_deterministic_algorithms_enabled()
    prev_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev_enabled, warn_only=prev_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests start (and leave) with empty dynamo caches."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def restore_num_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
