"""
Faster ways to dequantize 4-bit weights, each bit-identical to quantize.dequantize_4bit (the definition, which runs by
default). Opt in with an environment variable, so the programs, the notebooks and their child processes all see it:

    NANOQLORA_DEQUANTIZE=table    a byte-pair lookup in PyTorch (CPU and GPU)
    NANOQLORA_DEQUANTIZE=kernel   a C loop on the CPU (the table path elsewhere, or where it cannot be built)

The table path: a gather per byte instead of one per 4-bit index (each of the 256 byte values maps to its pair of code
values, read as one 8-byte integer), then one in-place multiply by the scales, in cache-sized chunks on one thread.

The kernel: even that gather is slow on the CPU (index_select alone takes two to three times as long as bitsandbytes'
whole dequantize). bitsandbytes is fast because its C++ keeps the 16 code values in one 512-bit register and looks up
16 indices with one instruction (AVX-512 `vpermps`); PyTorch has no op that does a lookup that way. So
dequantize_kernel.c holds that loop, in about 100 lines of C:
- compiled on first use with the system's C compiler (`cc`, or $CC: a command, flags allowed), into a small shared
  library cached under ~/.cache/nanoqlora/kernels (or $NANOQLORA_KERNEL_CACHE), and called through ctypes; no
  PyTorch headers, so it builds in a second;
- loading a shared library runs its code, so the cache is private: a folder of this user's, which no one else may
  write (created 0700), and a library is loaded only if its SHA-256 is the one recorded when this code built it (a
  file planted or changed there is rebuilt, with a warning, never loaded); once loaded, it must have its two
  functions and dequantize a test block exactly as the definition does;
- AVX-512 when the CPU has it, else AVX2 (16 lookups as two 8-entry permutes and a blend), else a plain C loop,
  chosen at run time, so a cached library never runs an instruction the CPU lacks; split over
  torch.get_num_threads() threads with OpenMP where the compiler has it;
- bit-identical: each value is code x scale, one fp32 multiply, and a double-quantized scale is (8-bit code x group
  scale) + mean, two roundings in that order, with contraction into fused multiply-adds turned off
  (tests/test_fast_dequantize.py compares every path with the definition on every layout).
Where it cannot be used (no compiler, a compile error, a cache folder others can write, a library that will not load
or lacks a function, a GPU tensor) the table path runs; the first time that happens, a warning says why, so a slower
run is never a silent one. `status()` names the path in use.
"""

import ctypes
import functools
import hashlib
import os
import shlex
import stat
import subprocess
import tempfile
import warnings

import torch
import torch.nn.functional as F

from quantize import DOUBLE_QUANT_BLOCK_SIZE, code_book_on, dequantize_absmax, dynamic_8bit_code_on
from support.common import user_cache_dir

PATHS = ("reference", "table", "kernel")  # the values NANOQLORA_DEQUANTIZE may take


def dequantize_4bit_fast(q, dtype=None):
    """quantize.dequantize_4bit(q, dtype) by the path NANOQLORA_DEQUANTIZE names."""
    path = os.environ.get("NANOQLORA_DEQUANTIZE", "reference")
    if path not in PATHS:
        raise ValueError(f"NANOQLORA_DEQUANTIZE={path!r}: use one of {', '.join(PATHS)} (or leave it unset)")
    values = dequantize_4bit_with_kernel(q) if path == "kernel" and q.codes.is_cpu else None
    if values is None:
        values = dequantize_4bit_table(q)
    return values[: q.numel()].view(q.shape).to(dtype or q.dtype)


def dequantize_4bit_with_kernel(q):
    """The C kernel's fp32 values (a whole number of bytes' worth), or None where it is not available."""
    if q.double_quant:
        scales = dict(absmax=None, absmax_codes=q.absmax, absmax_code_book=dynamic_8bit_code_on(q.absmax.device),
                      group_scale=q.absmax_scale.float(), mean=float(q.absmax_mean), group_size=DOUBLE_QUANT_BLOCK_SIZE)
    else:
        scales = dict(absmax=q.absmax.float())
    _, padded = code_book_on(q.quant_type, q.codes.device)
    return dequantize_4bit_kernel(q.codes, q.block_size, padded, **scales)


# ---------------------------------------------------------------------------------------------- the byte-pair table

DEQUANTIZE_CHUNK = 1 << 16  # values per step on one CPU thread: 256 KiB of fp32 output, within a core's L2 cache


@functools.lru_cache(maxsize=None)
def byte_pair_table(quant_type, device):
    """(256, 2) fp32: for each byte value, the pair of code values it packs, (code[byte >> 4], code[byte & 15])."""
    _, padded = code_book_on(quant_type, device)
    return torch.stack([padded.repeat_interleave(16), padded.repeat(16)], dim=1)


def dequantize_4bit_table(q):
    """fp32 values of q, flat (padded to whole blocks): code value of each index times its block's absmax, in PyTorch.

    Three things make this fast in plain PyTorch:
    - One gather yields both nibbles of a byte: the byte table holds the pair (code[byte >> 4], code[byte & 15]) for
      each of the 256 byte values, and viewing each pair as one 8-byte integer makes the gather copy a single element
      per byte instead of a row of two (about 4x faster on the CPU than unpacking the nibbles and gathering each).
    - The scales are dequantized once per call (dequantize_absmax, N/64 values), then one broadcast multiply applies
      them, in place, to the gathered values.
    - On one CPU thread the work goes in chunks of DEQUANTIZE_CHUNK values, each one finished (indices widened to int32,
      gathered, scaled) before the next starts. A whole tensor's int32 indices and gathered values would be several
      MB, so each pass would stream them from and back to main memory; a chunk's stay in the core's cache between the
      three steps. A GPU gets one pass over everything instead: there each step is a kernel launch, and its caches
      are not what a chunk would be sized for (not measured here: no GPU)."""
    pairs_as_int64 = byte_pair_table(q.quant_type, q.codes.device).view(torch.int64).view(-1)
    absmax = dequantize_absmax(q)
    blocks = absmax.numel()
    out = torch.empty(blocks * q.block_size // 2, dtype=torch.int64, device=q.codes.device)  # two fp32 values per int64
    codes = q.codes if q.codes.numel() == out.numel() else F.pad(q.codes, (0, out.numel() - q.codes.numel()))
    # chunks only for one CPU thread: with more, PyTorch splits each op over its threads only when it is large (about
    # 32K elements per thread), so a cache-sized chunk would run on one thread (measured with 2: 0.16x bitsandbytes
    # chunked against 0.22x in one pass)
    one_thread = q.codes.is_cpu and torch.get_num_threads() == 1
    chunk = max(DEQUANTIZE_CHUNK, q.block_size) if one_thread else out.numel() * 2  # a whole number of blocks
    for start in range(0, out.numel(), chunk // 2):
        pair_values = out[start : start + chunk // 2]
        torch.index_select(pairs_as_int64, 0, codes[start : start + chunk // 2].int(), out=pair_values)
        first_block = 2 * start // q.block_size
        scales = absmax[first_block : first_block + pair_values.numel() * 2 // q.block_size]
        pair_values.view(torch.float32).view(-1, q.block_size).mul_(scales[:, None])
    return out.view(torch.float32)


# ---------------------------------------------------------------------------------------------- the C kernel

KERNEL_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dequantize_kernel.c")
BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off"]
MIN_BYTES_PER_THREAD = 1 << 16  # below this, waking threads costs more than they save
SIMD_LOOPS = ["plain C loop", "AVX2", "AVX-512"]  # by the level the C code reports
MAX_SIMD_LEVEL = 2  # the tests lower it to run the AVX2 and plain loops on a machine that has AVX-512


def cache_dir():
    return os.environ.get("NANOQLORA_KERNEL_CACHE") or os.path.join(user_cache_dir(), "kernels")


def private_directory(directory):
    """`directory`, created (0700) if missing, once it is shown to be a real folder (not a link) of this user's that
    no one else may write into: a library another user could put there would run as us when loaded."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as error:
        raise RuntimeError(f"cannot use {directory} as the kernel cache ({error.strerror})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeError(f"the kernel cache {directory} is not a folder (a symbolic link?)")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise RuntimeError(f"the kernel cache {directory} belongs to another user (uid {info.st_uid}); point "
                           f"NANOQLORA_KERNEL_CACHE at a folder of your own")
    if info.st_mode & 0o022:
        raise RuntimeError(f"the kernel cache {directory} can be written by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                           f"make it private (chmod 700) or point NANOQLORA_KERNEL_CACHE at a private folder")
    return directory


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def trusted(library):
    """Whether `library` is the file this code built: a regular file of ours that only we may write, whose SHA-256 is
    the one recorded beside it (library + '.sha256', written after the library) when it was built."""
    record = library + ".sha256"
    try:
        info, record_info = os.lstat(library), os.lstat(record)
        with open(record) as f:
            recorded = f.read().strip()
    except OSError:
        return False
    for i in (info, record_info):
        if not stat.S_ISREG(i.st_mode) or i.st_mode & 0o022 or (hasattr(os, "getuid") and i.st_uid != os.getuid()):
            return False
    return file_sha256(library) == recorded


def build_library(compiler, flags, kernel_source, directory, library):
    """Compile into a temporary folder inside the cache, move the library into place, then record its SHA-256.
    Returns None, or the compiler's last line of error."""
    with tempfile.TemporaryDirectory(dir=directory) as build:  # several processes may build at once
        source = os.path.join(build, "dequantize_4bit.c")
        with open(source, "w") as f:
            f.write(kernel_source)
        built = os.path.join(build, "dequantize_4bit.so")
        try:
            result = subprocess.run([*compiler, *flags, source, "-o", built], capture_output=True, text=True)
        except OSError as error:  # no such compiler
            raise RuntimeError(f"cannot run the C compiler {shlex.join(compiler)!r} ({error.strerror})") from None
        if result.returncode != 0:
            return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        digest = file_sha256(built)
        with open(os.path.join(build, "sha256"), "w") as f:
            f.write(digest + "\n")
        os.chmod(built, 0o755)
        os.replace(built, library)  # atomic: another process never loads a half-written file
        os.replace(os.path.join(build, "sha256"), library + ".sha256")
    return None


def compile_kernel(compiler, directory):
    """Build dequantize_kernel.c into a shared library in `directory` (once: the file name carries a hash of the source,
    compiler and flags) and load it. `compiler` is a command line ($CC: "cc", "gcc -m64", ...). OpenMP first; if the
    compiler lacks it (Apple's clang), without it. `directory` must be private (private_directory), and a library there
    is loaded only if trusted() (else rebuilt, with a warning). Returns (ctypes library, which loop and threading it
    uses) or raises RuntimeError saying what failed."""
    with open(KERNEL_SOURCE_PATH) as f:
        kernel_source = f.read()
    command = shlex.split(compiler)
    if not command:
        raise RuntimeError("CC is empty: set it to a C compiler, or unset it for cc")
    directory = private_directory(directory)
    errors = []
    for flags in (BASE_FLAGS + ["-fopenmp"], BASE_FLAGS):
        key = hashlib.sha256("\n".join([kernel_source, *command, *flags]).encode()).hexdigest()[:16]
        library = os.path.join(directory, f"dequantize_4bit-{key}.so")
        if os.path.lexists(library) and not trusted(library):
            warnings.warn(f"NANOQLORA_DEQUANTIZE=kernel: {library} is not the library this code built (its SHA-256 is not the "
                          f"one recorded when it was built, or none is), so it is not loaded; building it again", RuntimeWarning)
            os.remove(library)
        if not os.path.exists(library):
            error = build_library(command, flags, kernel_source, directory, library)
            if error is not None:
                errors.append(error)
                continue
        if not trusted(library):
            raise RuntimeError(f"{library} changed after it was built; not loading it")
        try:
            lib = ctypes.CDLL(library)
            lib.dequantize_4bit.restype = None
            lib.simd_level.restype = ctypes.c_int
        except (OSError, AttributeError) as error:  # will not load; lacks a function
            raise RuntimeError(f"{library} cannot be used ({first_line(error)})") from None
        lib.dequantize_4bit.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        level = lib.simd_level()
        if level not in range(len(SIMD_LOOPS)):
            raise RuntimeError(f"{library} reports SIMD level {level}, which this code does not know")
        check_library(lib, library)
        threads = "OpenMP" if "-fopenmp" in flags else "one thread"
        return lib, f"C kernel ({SIMD_LOOPS[level]}, {threads})"
    raise RuntimeError(f"{compiler} could not compile the kernel: {'; '.join(errors)}")


def check_library(lib, library):
    """A loaded library must dequantize a small tensor (both scale layouts) exactly as the table path does."""
    from quantize import quantize_4bit

    generator = torch.Generator().manual_seed(0)
    for double_quant in (False, True):
        q = quantize_4bit(torch.randn(64, 64, generator=generator), "nf4", 64, double_quant)
        expected = dequantize_4bit_table(q)
        if q.double_quant:
            scales = dict(absmax=None, absmax_codes=q.absmax, absmax_code_book=dynamic_8bit_code_on(q.absmax.device),
                          group_scale=q.absmax_scale.float(), mean=float(q.absmax_mean), group_size=DOUBLE_QUANT_BLOCK_SIZE)
        else:
            scales = dict(absmax=q.absmax.float())
        values = run_kernel(lib, q.codes, q.block_size, code_book_on("nf4", "cpu")[1], **scales)
        if not torch.equal(values, expected):
            raise RuntimeError(f"{library} computes other values than the definition; not using it")


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


@functools.lru_cache(maxsize=None)
def load():
    """(the loaded library or None, which path CPU dequantization takes and why): built or found once per process."""
    try:
        return compile_kernel(os.environ.get("CC", "cc"), cache_dir())
    except (RuntimeError, OSError) as error:  # OSError: a cache folder or library the file system refuses
        warnings.warn(f"NANOQLORA_DEQUANTIZE=kernel: no C kernel ({error}), so 4-bit dequantize takes the byte-pair "
                      f"table path, about 3x slower. Install a C compiler (or set CC), or set NANOQLORA_DEQUANTIZE=table "
                      f"to choose that path.", RuntimeWarning)
        return None, f"byte-pair table in PyTorch (no C kernel: {error})"


def status():
    """Which path CPU dequantization takes, and where the library is (lib._name: the path it was loaded from)."""
    lib, description = load()
    return description if lib is None else f"{description}, {lib._name}"


def pointer(t):
    return None if t is None else t.data_ptr()


def has_storage(t):
    """False for the stand-in tensors of torch.func transforms and tracing, which have no memory to hand to C."""
    try:
        t.data_ptr()
        return True
    except RuntimeError:
        return False


def dequantize_4bit_kernel(codes, block_size, code_book, absmax, absmax_codes=None, absmax_code_book=None,
                    group_scale=None, mean=0.0, group_size=256):
    """fp32 values of `codes` (2 per byte, high nibble first) on the CPU: code_book[nibble] x scale of its block.
    code_book: 16 fp32 values. Scales: `absmax` (fp32, one per block), or None and the double-quantized form
    (absmax_codes uint8 per block, absmax_code_book of 256 fp32, group_scale fp32 per group_size blocks, mean).
    Returns a 1-D tensor of 2 x codes.numel() values, or None when the kernel is not available or the tensors have
    no storage (inside torch.func.grad, say), where the table path computes the same values."""
    lib, _ = load()
    if lib is None or not has_storage(codes):
        return None
    return run_kernel(lib, codes, block_size, code_book, absmax, absmax_codes, absmax_code_book, group_scale, mean, group_size)


def run_kernel(lib, codes, block_size, code_book, absmax, absmax_codes=None, absmax_code_book=None, group_scale=None,
               mean=0.0, group_size=256):
    """dequantize_4bit_kernel with the library `lib`."""
    out = torch.empty(2 * codes.numel(), dtype=torch.float32)
    if not has_storage(out):  # made inside a transform: a stand-in too
        return None
    tensors = [t.contiguous() if t is not None else None for t in (codes, code_book, absmax, absmax_codes, absmax_code_book, group_scale)]
    codes, code_book, absmax, absmax_codes, absmax_code_book, group_scale = tensors
    assert codes.dtype == torch.uint8 and code_book.dtype == torch.float32 and code_book.numel() == 16
    assert all(t is None or t.is_cpu for t in tensors)
    threads = max(1, min(torch.get_num_threads(), codes.numel() // MIN_BYTES_PER_THREAD))
    lib.dequantize_4bit(pointer(codes), codes.numel(), block_size.bit_length() - 1, pointer(code_book),
                        pointer(absmax), pointer(absmax_codes), pointer(absmax_code_book), pointer(group_scale),
                        float(mean), group_size.bit_length() - 1, pointer(out), threads, MAX_SIMD_LEVEL)
    return out
