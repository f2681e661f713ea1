"""Shared test setup: import the repo's modules, find ../shared offline, never touch the network."""
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
    import train

    def install():
        real_save = train.save_checkpoint

        def save_then_crash(*args, **kwargs):
            real_save(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
        return lambda: monkeypatch.setattr(train, "save_checkpoint", real_save)

    return install
