"""support/fast_dequantize.py: the opt-in paths (use_fast_dequantize(model, "table" or "kernel"), --dequantize) give
exactly the values of quantize.dequantize_4bit, the definition; nothing is compiled unless asked; when the kernel cannot
be built the table path runs, with a warning that says why."""

import copy
import hashlib
import os
import shutil
import subprocess
import warnings

import pytest
import torch

import quantize as Q
from support import fast_dequantize as K


@pytest.fixture
def fresh_kernel(monkeypatch):
    """load() runs once per process; these tests load again under their own settings, then forget that."""
    K.load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    K.load.cache_clear()


def require_kernel():
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler on this machine: the table path is all there is")
    assert K.load()[0] is not None, f"a C compiler is here, yet the kernel did not load: {K.status()}"


def definition(q):
    """quantize.dequantize_4bit, what a Linear4bit runs by default."""
    return Q.dequantize_4bit(q, torch.float32)


LAYOUTS = [(quant_type, double_quant) for quant_type in Q.QUANT_TYPES for double_quant in (False, True)]
SHAPES = [(1,), (3,), (33, 65), (4097,), (300, 64)]  # sizes that end inside a byte, a SIMD step or a block


@pytest.mark.parametrize("block_size", [2, 8, 16, 32, 64, 4096])
def test_table_path_equals_the_definition_bit_for_bit(block_size):
    torch.manual_seed(block_size)
    for (quant_type, double_quant), shape in [(layout, shape) for layout in LAYOUTS for shape in SHAPES]:
        q = Q.quantize_4bit(torch.randn(shape) * 0.05, quant_type, block_size, double_quant)
        values = K.dequantize_by_table(q, torch.float32)
        assert torch.equal(values, definition(q)), (quant_type, double_quant, shape)


@pytest.mark.parametrize("chunk", [64, 256, K.DEQUANTIZE_CHUNK])
@pytest.mark.parametrize("shape", [(4097,), (33, 65), (300, 64)])
def test_chunked_table_path_equals_unpacking_each_nibble(shape, chunk, monkeypatch):
    """The table path works through the codes a chunk at a time on one thread; any chunk size, and a tensor that ends
    inside a chunk or inside a block, give exactly code[nibble] x absmax[block] for every value, as the definition does."""
    monkeypatch.setattr(K, "DEQUANTIZE_CHUNK", chunk)
    torch.manual_seed(4)
    q = Q.quantize_nf4(torch.randn(shape), block_size=64, double_quant=True)
    nibbles = torch.stack([q.codes >> 4, q.codes & 15], dim=1).view(-1)[: q.numel()].long()
    expected = Q.CODE_BOOKS["nf4"][nibbles] * Q.dequantize_absmax(q).repeat_interleave(64)[: q.numel()]
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # chunks on one thread, one pass on more
            torch.set_num_threads(n)
            assert torch.equal(K.dequantize_4bit_table(q)[: q.numel()], expected), n
            assert torch.equal(definition(q), expected.view(shape)), n
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("simd_level", [0, 1, 2])
@pytest.mark.parametrize("block_size", [2, 8, 16, 32, 64, 4096])
def test_kernel_equals_the_definition_bit_for_bit(simd_level, block_size, monkeypatch):
    """Each loop (plain, AVX2, AVX-512, as far as this CPU has them), every code book, blocks smaller than a SIMD
    step (2 and 8: the plain loop; 16: AVX2 but not AVX-512) and larger, both scale layouts."""
    require_kernel()
    monkeypatch.setattr(K, "MAX_SIMD_LEVEL", simd_level)
    torch.manual_seed(block_size)
    for (quant_type, double_quant), shape in [(layout, shape) for layout in LAYOUTS for shape in SHAPES]:
        q = Q.quantize_4bit(torch.randn(shape) * 0.05, quant_type, block_size, double_quant)
        values = K.dequantize_4bit_with_kernel(q)
        assert values is not None and values.dtype == torch.float32 and values.numel() == 2 * q.codes.numel()
        expected = definition(q).view(-1)
        assert torch.equal(values[: q.numel()], expected), (quant_type, double_quant, shape)


def test_kernel_splits_work_over_threads_without_changing_a_value(fresh_kernel):
    """Small per-thread shares force the split (and a last share that ends mid-way); the result is the same."""
    require_kernel()
    q = Q.quantize_nf4(torch.randn(1000, 777), double_quant=True)
    expected = definition(q)
    threads = torch.get_num_threads()
    fresh_kernel.setattr(K, "MIN_BYTES_PER_THREAD", 1000)
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert torch.equal(K.dequantize_by_kernel(q, torch.float32), expected), n
    finally:
        torch.set_num_threads(threads)


def test_nothing_is_compiled_unless_asked(fresh_kernel, tmp_path):
    """The default path is the definition in quantize.py: a QLoRA forward and backward build and load no library."""
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(tmp_path / "cache"))
    import lora
    from model import GPT, GPTConfig

    model = lora.apply_lora(
        Q.quantize_model(GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32)))
    )
    tokens = torch.randint(32, (2, 9))
    model(tokens[:, :-1], tokens[:, 1:])[1].backward()
    assert K.load.cache_info().currsize == 0 and not (tmp_path / "cache").exists()


def test_kernel_is_used_when_asked_and_says_so(fresh_kernel):
    """use_fast_dequantize(model, "kernel") reaches every Linear4bit, nested ones included, and a copy of the model
    keeps it; the layer then computes through the kernel exactly what the definition computes."""
    require_kernel()
    from model import GPT, GPTConfig

    model = Q.quantize_model(GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=64)))
    layers = [m for m in model.modules() if isinstance(m, Q.Linear4bit)]
    expected = [definition(layer.quantized_weight) for layer in layers]
    assert K.use_fast_dequantize(model, "kernel") is model
    calls = []
    real = K.run_kernel
    fresh_kernel.setattr(K, "run_kernel", lambda *a, **k: calls.append(1) or real(*a, **k))
    copied = [m for m in copy.deepcopy(model).modules() if isinstance(m, Q.Linear4bit)]
    for layers_of_a_model in (layers, copied):
        calls.clear()
        assert all(torch.equal(layer.dequantize(torch.float32), e) for layer, e in zip(layers_of_a_model, expected))
        assert len(calls) == len(layers) == 12, "a layer did not take the kernel"
    assert K.status().startswith("C kernel (")
    K.use_fast_dequantize(model, "reference")  # and back to the definition
    calls.clear()
    assert torch.equal(layers[0].dequantize(torch.float32), expected[0]) and not calls


def test_library_is_built_once_per_source_and_compiler(tmp_path):
    require_kernel()
    compiler = os.environ.get("CC", "cc")
    first, _ = K.compile_kernel(compiler, str(tmp_path))
    libraries = list(tmp_path.glob("dequantize_4bit-*.so"))
    assert len(libraries) == 1 and first._name == str(libraries[0])
    built_at = libraries[0].stat().st_mtime_ns
    second, _ = K.compile_kernel(compiler, str(tmp_path))
    assert second._name == first._name and libraries[0].stat().st_mtime_ns == built_at
    # no build directory left behind; the library's SHA-256, recorded when it was built, beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [libraries[0].name, libraries[0].name + ".sha256"]
    assert (tmp_path / (libraries[0].name + ".sha256")).read_text().strip() == K.file_sha256(libraries[0])


def test_no_compiler_falls_back_to_the_table_path_with_a_warning(fresh_kernel, tmp_path):
    fresh_kernel.setenv("CC", str(tmp_path / "no-such-compiler"))
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(tmp_path / "cache"))
    q = Q.quantize_nf4(torch.randn(64, 64))
    with pytest.warns(RuntimeWarning, match="no-such-compiler"):
        values = K.dequantize_by_kernel(q)
    assert torch.equal(values, definition(q).view(64, 64))
    assert K.status().startswith("byte-pair table in PyTorch (no C kernel: cannot run the C compiler")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough: the next call neither retries nor warns again
        K.dequantize_by_kernel(q)


def test_compile_error_is_reported(tmp_path):
    with pytest.raises(RuntimeError, match="could not compile the kernel"):
        K.compile_kernel("false", str(tmp_path))  # a "compiler" that always fails


def test_an_unknown_path_or_a_model_without_4bit_layers_is_a_clear_error():
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match="dequantize path 'fast': use one of reference, table, kernel"):
        K.use_fast_dequantize(Q.quantize_model(copy.deepcopy(model)), "fast")
    with pytest.raises(ValueError, match="dequantize path 'table': the model has no 4-bit layer; quantize it first"):
        K.use_fast_dequantize(model, "table")  # a silent no-op would leave the run on a path it did not ask for
    assert K.use_fast_dequantize(model, "reference") is model


@pytest.mark.parametrize("path", ["table", "kernel"])
def test_qlora_training_is_the_same_on_every_path(path, monkeypatch):
    """Three QLoRA steps on a tiny GPT: the opt-in path and the definition give the same adapters to the last bit."""
    if path == "kernel":
        require_kernel()
    import lora
    from model import GPT, GPTConfig

    def train(dequantize):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
        model = K.use_fast_dequantize(Q.quantize_model(model), dequantize)
        model = lora.apply_lora(model, rank=4, alpha=8, targets="all-linear")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        tokens = torch.randint(64, (4, 33), generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            model(tokens[:, :-1], tokens[:, 1:])[1].backward()
            optimizer.step()
            optimizer.zero_grad()
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    reference = train("reference")
    calls = []
    table = K.dequantize_4bit_table
    monkeypatch.setattr(K, "dequantize_4bit_table", lambda q: calls.append(1) or table(q))
    fast = train(path)
    assert (not calls) if path == "kernel" else calls, "the chosen path did not run"
    assert reference.keys() == fast.keys() and all(torch.equal(reference[k], fast[k]) for k in reference)


# ---------------------------------------------------------------------------------------------------------
# issue 26: the cache loads only what this code built; anything else falls back to the table path, with a warning

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(getenv("PLANTED_MARKER"), "w");
    if (f) { fputs("a planted library ran", f); fclose(f); }
}
int simd_level(void) { return 0; }
void dequantize_4bit(const unsigned char *codes, long long n, int block_shift, const float *book, const float *absmax,
                     const unsigned char *absmax_codes, const float *absmax_book, const float *group_scale, float mean,
                     int group_shift, float *out, int threads, int max_simd) {
    for (long long i = 0; i < 2 * n; i++) out[i] = 0.0f;
}
"""


def compile_c(source, directory, name):
    """A shared library built from C source, as an attacker (or a broken build) would leave one."""
    path = os.path.join(directory, name)
    with open(path + ".c", "w") as f:
        f.write(source)
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", path + ".c", "-o", path], check=True)
    return path


def expected_library_name(compiler="cc"):
    """The file name the kernel is cached under for `compiler` (OpenMP build): a hash of source, compiler and flags."""
    with open(K.KERNEL_SOURCE_PATH) as f:
        source = f.read()
    key = hashlib.sha256("\n".join([source, compiler, *K.BASE_FLAGS, "-fopenmp"]).encode()).hexdigest()[:16]
    return f"dequantize_4bit-{key}.so"


@pytest.mark.parametrize("genuine_build_first", [False, True], ids=["planted alone", "planted over a genuine build"])
def test_a_library_planted_in_the_cache_is_never_loaded(fresh_kernel, tmp_path, genuine_build_first):
    """A library at the cached kernel's name, not built by this code: its constructor wrote a file and its dequantize
    returned zeros, used silently ("C kernel", a slightly worse loss). Now its hash gives it away (none recorded, or
    the genuine build's): it is rebuilt, with a warning, and never loaded."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if genuine_build_first:  # the library this code built, and the SHA-256 recorded beside it
        K.compile_kernel("cc", str(cache))
        assert (cache / (expected_library_name() + ".sha256")).exists()
    os.replace(compile_c(PLANTED, str(tmp_path), "planted.so"), cache / expected_library_name())
    fresh_kernel.setenv("CC", "cc")
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(cache))
    fresh_kernel.setenv("PLANTED_MARKER", str(tmp_path / "marker"))
    q = Q.quantize_nf4(torch.randn(64, 64))
    with pytest.warns(RuntimeWarning, match="is not the library this code built"):
        values = K.dequantize_by_kernel(q)
    assert not (tmp_path / "marker").exists(), "the planted library's code ran"
    assert torch.equal(values, definition(q).view(64, 64)) and K.status().startswith("C kernel (")


def test_a_cache_others_can_write_is_not_used(fresh_kernel, tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # NANOQLORA_KERNEL_CACHE on a shared path: anyone could plant a library there
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(shared))
    q = Q.quantize_nf4(torch.randn(64, 64))
    with pytest.warns(RuntimeWarning, match="can be written by other users \\(mode 777\\); make it private"):
        values = K.dequantize_by_kernel(q)
    assert torch.equal(values, definition(q).view(64, 64)) and K.status().startswith("byte-pair table")
    assert list(shared.iterdir()) == []  # nothing built or loaded there


@pytest.mark.parametrize(
    "source, says",
    [
        ("int simd_level(void) { return 0; }\n", "cannot be used .*undefined symbol: dequantize_4bit"),
        (
            PLANTED.replace("__attribute__((constructor))", "__attribute__((unused))"),
            "computes other values than the definition",
        ),
    ],
    ids=["no dequantize_4bit", "returns zeros"],
)
def test_a_library_that_lacks_the_function_or_computes_wrong_values_falls_back(fresh_kernel, tmp_path, source, says):
    """Even a library this code built (so its hash matches) is used only if it has the function and dequantizes a test
    block exactly: before, a missing symbol was an AttributeError traceback, and wrong values were used."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    (tmp_path / "kernel.c").write_text(source)
    fresh_kernel.setattr(K, "KERNEL_SOURCE_PATH", str(tmp_path / "kernel.c"))
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(tmp_path / "cache"))
    q = Q.quantize_nf4(torch.randn(64, 64))
    with pytest.warns(RuntimeWarning, match=says):
        values = K.dequantize_by_kernel(q)
    assert torch.equal(values, definition(q).view(64, 64)) and K.status().startswith("byte-pair table")


def test_cc_may_hold_flags(fresh_kernel, tmp_path):
    """CC="cc -O1" is a command line, as make reads it, not a program named 'cc -O1'."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    fresh_kernel.setenv("CC", "cc -O1")
    fresh_kernel.setenv("NANOQLORA_KERNEL_CACHE", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert K.status().startswith("C kernel (")
