"""Shared test setup: import the repo's modules, find ../shared offline, never touch the network; the `device` fixture
that runs a test on every device present; random weights at a scale where a wrong computation shows."""

import atexit
import os
import shutil
import socket
import sys
import tempfile

import pytest
import torch

# Test models are tiny: a second thread gains little and, on a busy 2-core machine, oversubscription makes
# every op many times slower. One thread keeps the suite's time steady.
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")
TIKTOKEN_CACHE = os.path.join(SHARED, "tiktoken_cache")
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", TIKTOKEN_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# dequantize_kernel builds its C library here rather than in the user's ~/.cache (the scripts the tests run inherit it)
KERNEL_CACHE = tempfile.mkdtemp(prefix="nanoqlora-test-kernels-")
os.environ.setdefault("NANOQLORA_KERNEL_CACHE", KERNEL_CACHE)
atexit.register(shutil.rmtree, KERNEL_CACHE, ignore_errors=True)


# The tests that matter on a GPU (the references, a few training steps, generation, packing, the loss) take `device`:
# "cpu" always, "cuda" where torch sees a CUDA GPU. Elsewhere the CUDA variants are skipped, not failed; they carry the
# `cuda` mark, so `python -m pytest -m cuda` runs exactly the suite's CUDA part (benchmarks/gpu_check.py does).
CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA GPU here")]),
]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: a test's CUDA variant (python -m pytest -m cuda runs only these)")


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def bitsandbytes_on(device):
    """bitsandbytes.functional for comparisons on `device`, or skip: its CPU build has no CUDA kernels, and a CUDA GPU
    with a CPU-only bitsandbytes cannot check anything."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    if device == "cuda":
        import bitsandbytes.cextension

        if getattr(bitsandbytes.cextension, "BNB_BACKEND", "") != "CUDA":
            pytest.skip("this bitsandbytes has no CUDA build")
    return bnb


def randomize_weights(model, std=0.2, seed=0):
    """Every parameter of `model` drawn again at `std` (LayerNorm weights 1 + std N(0, 1)), in place, and returned.
    At GPT-2's init (std 0.02) the activations are so small that a model computing the wrong function can still
    match a reference to 1e-4 (an exact-erf GELU instead of GPT-2's tanh form differs by 1.5e-5 there); at 0.2 the
    right GPT-2 matches transformers' to ~4e-6 and that wrong one is 2.7e-3 away (tests/test_model.py)."""
    g, seen = torch.Generator().manual_seed(seed), set()
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if id(p) in seen:  # a tied weight (GPT-2's lm_head is wte) is drawn once
                    continue
                seen.add(id(p))
                noise = std * torch.randn(p.shape, generator=g).to(p.device, p.dtype)
                p.copy_(1 + noise if isinstance(module, torch.nn.LayerNorm) and name == "weight" else noise)
    return model


def shared_data(name):
    """Path of a reference file in ../shared/data, or skip the test when this checkout has none."""
    path = os.path.join(SHARED, "data", name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    return path


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test instead of reaching out."""

    def refuse(*args, **kwargs):
        raise RuntimeError("tests must not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def crash_after_checkpoint(monkeypatch):
    """Call it to make the next train.train run die (KeyboardInterrupt) right after its first checkpoint is written, as
    a killed run would; call the function it returns to restore the real save_checkpoint."""
    from support import resume

    def install():
        real_save = resume.save_checkpoint

        def save_then_crash(*args, **kwargs):
            real_save(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(resume, "save_checkpoint", save_then_crash)
        return lambda: monkeypatch.setattr(resume, "save_checkpoint", real_save)

    return install


class WritesMarker:
    """Unpickling this runs open(path, "w"): the file appears iff a loader unpickled arbitrary objects."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))
