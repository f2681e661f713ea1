"""dequantize_kernel: the C loop gives exactly the PyTorch path's values, and when it cannot be built the
PyTorch path runs, with a warning that says why."""
import os
import shutil
import warnings

import pytest
import torch

import dequantize_kernel as K
import quantize as Q


@pytest.fixture
def fresh_kernel(monkeypatch):
    """load() runs once per process; these tests load again under their own settings, then forget that."""
    K.load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    K.load.cache_clear()


def require_kernel():
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: the PyTorch path is all there is")
    assert K.load()[0] is not None, f"a C compiler is here, yet the kernel did not load: {K.status()}"


@pytest.mark.parametrize("simd_level", [0, 1, 2])
@pytest.mark.parametrize("quant_type", Q.QUANT_TYPES)
@pytest.mark.parametrize("block_size", [2, 8, 16, 32, 64, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
def test_kernel_equals_pytorch_path_bit_for_bit(simd_level, quant_type, block_size, double_quant, monkeypatch):
    """Each loop (plain, AVX2, AVX-512, as far as this CPU has them), every code book, blocks smaller than a SIMD
    step (2 and 8: the plain loop; 16: AVX2 but not AVX-512) and larger, both scale layouts, and sizes that end inside
    a byte, a SIMD step or a block."""
    require_kernel()
    monkeypatch.setattr(K, "MAX_SIMD_LEVEL", simd_level)
    torch.manual_seed(block_size)
    for shape in [(1,), (3,), (33, 65), (4097,), (300, 64)]:
        q = Q.quantize_4bit(torch.randn(shape) * 0.05, quant_type, block_size, double_quant)
        values = Q.dequantize_4bit_with_kernel(q)
        assert values is not None and values.dtype == torch.float32 and values.numel() == 2 * q.codes.numel()
        expected = Q.dequantize_4bit_pytorch(q)[: q.numel()]
        assert torch.equal(values[: q.numel()], expected), (shape, (values[: q.numel()] - expected).abs().max())


def test_kernel_splits_work_over_threads_without_changing_a_value(fresh_kernel):
    """Small per-thread shares force the split (and a last share that ends mid-way); the result is the same."""
    require_kernel()
    q = Q.quantize_nf4(torch.randn(1000, 777), double_quant=True)
    expected = Q.dequantize_4bit_pytorch(q)[: q.numel()]
    threads = torch.get_num_threads()
    fresh_kernel.setattr(K, "MIN_BYTES_PER_THREAD", 1000)
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(Q.dequantize_4bit(q).view(-1), expected), n
    finally:
        torch.set_num_threads(threads)


def test_dequantize_uses_the_kernel_and_says_so():
    require_kernel()
    assert K.status().startswith("C kernel (")
    q = Q.quantize_nf4(torch.randn(64, 64))
    assert torch.equal(Q.dequantize_nf4(q), Q.dequantize_4bit_pytorch(q).view(64, 64))


def test_library_is_built_once_per_source_and_compiler(tmp_path):
    require_kernel()
    compiler = os.environ.get("CC", "cc")
    first, _ = K.compile_kernel(compiler, str(tmp_path))
    libraries = list(tmp_path.glob("dequantize_4bit-*.so"))
    assert len(libraries) == 1 and first._name == str(libraries[0])
    built_at = libraries[0].stat().st_mtime_ns
    second, _ = K.compile_kernel(compiler, str(tmp_path))
    assert second._name == first._name and libraries[0].stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [libraries[0].name]  # no build directory left behind


def test_no_compiler_falls_back_to_pytorch_with_a_warning(fresh_kernel, tmp_path):
    fresh_kernel.setenv("CC", str(tmp_path / "no-such-compiler"))
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(tmp_path / "cache"))
    fresh_kernel.delenv(K.SWITCH, raising=False)
    q = Q.quantize_nf4(torch.randn(64, 64))
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        values = Q.dequantize_nf4(q)
    assert torch.equal(values, Q.dequantize_4bit_pytorch(q).view(64, 64))
    assert K.status().startswith("PyTorch (no C kernel: cannot run the C compiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: the next call neither retries nor warns again
        Q.dequantize_nf4(q)


def test_compile_error_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="could not compile the kernel"):
        K.compile_kernel("false", str(tmp_path))  # a "compiler" that always fails


@pytest.mark.parametrize("value", ["0", "off", "False"])
def test_switch_chooses_the_pytorch_path_silently(fresh_kernel, value):
    fresh_kernel.setenv(K.SWITCH, value)
    q = Q.quantize_nf4(torch.randn(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(Q.dequantize_nf4(q), Q.dequantize_4bit_pytorch(q).view(64, 64))
    assert K.status() == f"PyTorch ({K.SWITCH}={value})"


def test_qlora_training_is_the_same_with_and_without_the_kernel(monkeypatch):
    """Three QLoRA steps on a tiny GPT: the kernel and the PyTorch path give the same adapters to the last bit."""
    require_kernel()
    import lora
    from model import GPT, GPTConfig

    def train():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
        model = lora.apply_lora(Q.quantize_model(model), rank=4, alpha=8, targets="all-linear")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(64, (4, 33), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
            optimizer.step()
            optimizer.zero_grad()
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    calls = []
    with_kernel_fn = Q.dequantize_4bit_with_kernel
    monkeypatch.setattr(Q, "dequantize_4bit_with_kernel", lambda q: calls.append(1) or with_kernel_fn(q))
    with_kernel = train()
    assert calls, "the kernel was never asked"
    monkeypatch.setattr(Q, "dequantize_4bit_with_kernel", lambda q: None)  # the PyTorch path
    without = train()
    assert with_kernel.keys() == without.keys() and all(torch.equal(with_kernel[k], without[k]) for k in with_kernel)
