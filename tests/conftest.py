"""Test setup. TRITON_INTERPRET must be set before any kernel module is imported: @triton.jit reads it when a
kernel is decorated. On a machine with CUDA, tests/gpu runs the compiled kernels instead (set HF_TURBO_GPU_TESTS=1,
which leaves the interpreter off)."""

import os

if os.environ.get("HF_TURBO_GPU_TESTS") != "1":
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs every run (the seed is printed on failure so a run can be replayed)."""
    seed = int(os.environ.get("HF_TURBO_SEED", torch.seed() % (2**31)))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None and not call.excinfo.errisinstance(pytest.skip.Exception):
        for name, value in item.user_properties:
            if name == "seed":
                print(f"\n[hf_turbo] replay with HF_TURBO_SEED={value}")


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: on a busy 2-core machine OpenMP spinning made model tests ~15x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
