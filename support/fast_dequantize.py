"""
Faster ways to compute quantize.dequantize_4bit's values, bit for bit. quantize.py holds the definition and knows
nothing of these: a program opts in (--dequantize) with use_fast_dequantize(model, path), which hands every Linear4bit
of the model the function it dequantizes with.

    reference   quantize.dequantize_4bit, the definition (the default)
    table       in PyTorch (CPU and GPU): one gather per byte, not per 4-bit index (each of the 256 byte values maps to
                its pair of code values, read as one 8-byte integer), then one in-place multiply by the scales
    kernel      dequantize_kernel.c on the CPU (the table path on a GPU, or where the kernel cannot be built)

The kernel: PyTorch has no op that looks up 16 indices in a 16-value table with one instruction, as bitsandbytes' C++
does (AVX-512 `vpermps`), so dequantize_kernel.c holds that loop (AVX2: two 8-entry permutes and a blend; else plain C),
chosen at run time so that a cached library never runs an instruction the CPU lacks, split over
torch.get_num_threads() OpenMP threads. It is compiled on first use with the system's C compiler (`cc`, or $CC: a
command, flags allowed) into a shared library under ~/.cache/nanoqlora/kernels (or $NANOQLORA_KERNEL_CACHE), called
through ctypes. Loading a library runs its code, so the cache must be a folder of this user's that no one else may
write (created 0700); a library is loaded only if its SHA-256 is the one recorded when this code built it (a file
planted or changed there is rebuilt, with a warning, never loaded); once loaded, it must have its two functions and
dequantize a test block exactly as the definition does. Bit-identical: each value is code x scale, one fp32 multiply,
and a double-quantized scale is (8-bit code x group scale) + mean, two roundings in that order (-ffp-contract=off).
Where the kernel cannot be used, the table path runs and a warning says why, once. status() names the path in use.
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

import quantize
from support.files import user_cache_dir

PATHS = ("reference", "table", "kernel")


def dequantizer(path):
    """The function (q, dtype=None) that computes quantize.dequantize_4bit's values by `path`, one of PATHS."""
    if path not in PATHS:
        raise ValueError(f"dequantize path {path!r}: use one of {', '.join(PATHS)}")
    return {"reference": quantize.dequantize_4bit, "table": dequantize_by_table, "kernel": dequantize_by_kernel}[path]


def use_fast_dequantize(model, path):
    """Make every Linear4bit of `model` dequantize by `path`, one of PATHS (all compute the same values); returns it."""
    dequantize = dequantizer(path)
    layers = [module for module in model.modules() if isinstance(module, quantize.Linear4bit)]
    if path != "reference" and not layers:
        raise ValueError(f"dequantize path {path!r}: the model has no 4-bit layer; quantize it first (quantize_model)")
    for layer in layers:
        layer.dequantize_weight = dequantize
    return model


def dequantize_by_table(q, dtype=None):
    """quantize.dequantize_4bit(q, dtype) by the byte-pair table."""
    return shaped(dequantize_4bit_table(q), q, dtype)


def dequantize_by_kernel(q, dtype=None):
    """quantize.dequantize_4bit(q, dtype) by the C kernel on the CPU, by the byte-pair table elsewhere."""
    values = dequantize_4bit_with_kernel(q) if q.codes.is_cpu else None
    return shaped(dequantize_4bit_table(q) if values is None else values, q, dtype)


def shaped(values, q, dtype):
    return values[: q.numel()].view(q.shape).to(dtype or q.dtype)


# ---------------------------------------------------------------------------------------------- the byte-pair table

DEQUANTIZE_CHUNK = 1 << 16  # values per step on one CPU thread: 256 KiB of fp32 output, within a core's L2 cache


@functools.cache
def byte_pair_table(quant_type, device):
    """(256, 2) fp32: for each byte value, the pair of code values it packs, (code[byte >> 4], code[byte & 15])."""
    _, padded = quantize.code_book_on(quant_type, device)
    return torch.stack([padded.repeat_interleave(16), padded.repeat(16)], dim=1)


def dequantize_4bit_table(q):
    """fp32 values of q, flat (padded to whole blocks): code value of each index times its block's absmax. On one CPU
    thread, in chunks of DEQUANTIZE_CHUNK values, each finished (indices widened to int32, gathered, scaled) before the
    next starts: a chunk stays in the core's cache between the three steps, where a whole tensor's worth would stream
    through main memory three times. With more threads, or on a GPU, one pass: PyTorch splits an op over its threads
    only when it is large (32K elements per thread, its grain size), and on a GPU each step is a kernel launch."""
    pairs_as_int64 = byte_pair_table(q.quant_type, q.codes.device).view(torch.int64).view(-1)
    absmax = quantize.dequantize_absmax(q)
    out = torch.empty(absmax.numel() * q.block_size // 2, dtype=torch.int64, device=q.codes.device)  # 2 fp32 per int64
    codes = q.codes if q.codes.numel() == out.numel() else F.pad(q.codes, (0, out.numel() - q.codes.numel()))
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
        raise RuntimeError(
            f"the kernel cache {directory} belongs to another user (uid {info.st_uid}); point "
            f"NANOQLORA_KERNEL_CACHE at a folder of your own"
        )
    if info.st_mode & 0o022:
        raise RuntimeError(
            f"the kernel cache {directory} can be written by other users (mode "
            f"{stat.S_IMODE(info.st_mode):o}); make it private (chmod 700) or point "
            f"NANOQLORA_KERNEL_CACHE at a private folder"
        )
    return directory


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def trusted(library):
    """Whether `library` is the file this code built: a regular file of ours that only we may write, whose SHA-256 is
    the one recorded beside it (library + '.sha256', written after the library) when it was built."""
    try:
        infos = [os.lstat(library), os.lstat(library + ".sha256")]
        with open(library + ".sha256") as f:
            recorded = f.read().strip()
    except OSError:
        return False
    for info in infos:
        if not stat.S_ISREG(info.st_mode) or info.st_mode & 0o022:
            return False
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            return False
    return file_sha256(library) == recorded


def build_library(compiler, flags, kernel_source, directory, library):
    """Compile into a temporary folder inside the cache, move the library into place, then record its SHA-256.
    Returns None, or the compiler's last line of error."""
    with tempfile.TemporaryDirectory(dir=directory) as build:  # several processes may build at once
        source, built = os.path.join(build, "dequantize_4bit.c"), os.path.join(build, "dequantize_4bit.so")
        with open(source, "w") as f:
            f.write(kernel_source)
        try:
            result = subprocess.run([*compiler, *flags, source, "-o", built], capture_output=True, text=True)
        except OSError as error:  # no such compiler
            raise RuntimeError(f"cannot run the C compiler {shlex.join(compiler)!r} ({error.strerror})") from None
        if result.returncode != 0:
            return result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        with open(os.path.join(build, "sha256"), "w") as f:
            f.write(file_sha256(built) + "\n")
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
            warnings.warn(
                f"dequantize kernel: {library} is not the library this code built (its SHA-256 is not the "
                f"one recorded when it was built, or none is), so it is not loaded; building it again",
                RuntimeWarning,
            )
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
            lib.dequantize_4bit.restype, lib.simd_level.restype = None, ctypes.c_int
        except (OSError, AttributeError) as error:  # will not load; lacks a function
            raise RuntimeError(f"{library} cannot be used ({first_line(error)})") from None
        pointer, int64, int32, float32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.dequantize_4bit.argtypes = [pointer, int64, int32, *[pointer] * 5, float32, int32, pointer, int32, int32]
        level = lib.simd_level()
        if level not in range(len(SIMD_LOOPS)):
            raise RuntimeError(f"{library} reports SIMD level {level}, which this code does not know")
        generator = torch.Generator().manual_seed(0)
        for double_quant in (False, True):  # both scale layouts, exactly as the table path computes them
            q = quantize.quantize_4bit(torch.randn(64, 64, generator=generator), "nf4", 64, double_quant)
            if not torch.equal(run_kernel(lib, q), dequantize_4bit_table(q)):
                raise RuntimeError(f"{library} computes other values than the definition; not using it")
        return lib, f"C kernel ({SIMD_LOOPS[level]}, {'OpenMP' if '-fopenmp' in flags else 'one thread'})"
    raise RuntimeError(f"{compiler} could not compile the kernel: {'; '.join(errors)}")


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


@functools.cache
def load():
    """(the loaded library or None, which path CPU dequantization takes and why): built or found once per process."""
    try:
        return compile_kernel(os.environ.get("CC", "cc"), cache_dir())
    except (RuntimeError, OSError) as error:  # OSError: a cache folder or library the file system refuses
        warnings.warn(
            f"dequantize kernel: no C kernel ({error}), so 4-bit dequantize takes the slower byte-pair table "
            f"path. Install a C compiler (or set CC), or choose --dequantize table for that path.",
            RuntimeWarning,
        )
        return None, f"byte-pair table in PyTorch (no C kernel: {error})"


def status():
    """Which path CPU dequantization takes, and where the library is (lib._name: the path it was loaded from)."""
    lib, description = load()
    return description if lib is None else f"{description}, {lib._name}"


def has_storage(t):
    """False for the stand-in tensors of torch.func transforms and tracing, which have no memory to hand to C."""
    try:
        t.data_ptr()
        return True
    except RuntimeError:
        return False


def dequantize_4bit_with_kernel(q):
    """The C kernel's fp32 values of q's CPU tensors (flat, 2 per byte of codes), or None where the kernel is not
    available or the tensors have no storage (inside torch.func.grad, say): there the table path computes them."""
    lib, _ = load()
    return run_kernel(lib, q) if lib is not None and has_storage(q.codes) else None


def run_kernel(lib, q):
    """dequantize_4bit_with_kernel with the library `lib`: code_book[nibble] x the scale of its block (fp32 absmax, or
    8-bit codes into the dynamic code x the fp32 scale of their group of 256 blocks + the mean)."""
    out = torch.empty(2 * q.codes.numel(), dtype=torch.float32)
    if not has_storage(out):  # made inside a transform: a stand-in too
        return None
    absmax, absmax_codes, absmax_code_book, group_scale, mean = q.absmax.float(), None, None, None, 0.0
    if q.double_quant:
        absmax, absmax_codes, absmax_code_book = None, q.absmax, quantize.dynamic_8bit_code_on("cpu")
        group_scale, mean = q.absmax_scale.float(), float(q.absmax_mean)
    code_book = quantize.code_book_on(q.quant_type, "cpu")[1]
    tensors = [q.codes, code_book, absmax, absmax_codes, absmax_code_book, group_scale]
    tensors = [None if t is None else t.contiguous() for t in tensors]  # kept alive until the call returns
    assert tensors[0].dtype == torch.uint8 and all(t is None or t.is_cpu for t in tensors)
    pointers = [None if t is None else t.data_ptr() for t in tensors]
    threads = max(1, min(torch.get_num_threads(), q.codes.numel() // MIN_BYTES_PER_THREAD))
    group_shift = quantize.DOUBLE_QUANT_BLOCK_SIZE.bit_length() - 1
    arguments = [pointers[0], q.codes.numel(), q.block_size.bit_length() - 1, *pointers[1:], mean, group_shift]
    lib.dequantize_4bit(*arguments, out.data_ptr(), threads, MAX_SIMD_LEVEL)
    return out
