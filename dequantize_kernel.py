"""
An optional C kernel for the one loop PyTorch cannot write fast: 4-bit dequantization on the CPU.

quantize.dequantize_4bit_pytorch is readable PyTorch: look each byte up in a table of code pairs, then multiply by
the block's scale. On the CPU that runs at about a third of bitsandbytes' speed, and no rearrangement of PyTorch ops
closes the gap (README, "Benchmarks"): the gather alone (index_select) takes two to three times as long as
bitsandbytes' whole dequantize. bitsandbytes is fast because its C++ keeps the 16 code values in one 512-bit
register and looks up 16 indices with one instruction (AVX-512 `vpermps`); PyTorch has no op that does a lookup
that way.

So this module holds that loop, in about 100 lines of C, and nothing else:
- compiled on first use with the system's C compiler (`cc`, or $CC), into a small shared library cached under
  ~/.cache/nanoqlora/kernels (or $NANOQLORA_KERNEL_CACHE), and called through ctypes; no PyTorch headers, so it
  builds in a second;
- AVX-512 when the CPU has it, else AVX2 (16 lookups as two 8-entry permutes and a blend), else a plain C loop,
  chosen at run time, so a cached library never runs an instruction the CPU lacks; split over
  torch.get_num_threads() threads with OpenMP where the compiler has it;
- bit-identical to quantize.dequantize_4bit's PyTorch path: each value is code x scale, one fp32 multiply, and a
  double-quantized scale is (8-bit code x group scale) + mean, two roundings in that order, with contraction
  into fused multiply-adds turned off (tests/test_dequantize_kernel.py compares the two on every layout).

When it cannot be used (no compiler, a compile error, a GPU tensor, or NANOQLORA_DEQUANTIZE_KERNEL=0) the
PyTorch path runs, which computes the same values; the first time a CPU dequantize falls back for a reason other
than the switch, a warning says why, so a slower run is never a silent one. `status()` names the path in use.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import warnings

import torch

from common import user_cache_dir

KERNEL_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>

/* Where each block's scale comes from: fp32 absmax, or (double quantization) an 8-bit code per block,
   an fp32 scale per group of 2^group_shift blocks and one fp32 mean. */
typedef struct {
    const float *absmax;            /* NULL when double quantized */
    const uint8_t *absmax_codes;
    const float *absmax_code_book;  /* 256 values */
    const float *group_scale;
    float mean;
    int group_shift;
} Scales;

static inline float block_scale(const Scales *s, int64_t block) {
    if (s->absmax != NULL) return s->absmax[block];
    float scaled = s->absmax_code_book[s->absmax_codes[block]] * s->group_scale[block >> s->group_shift];
    return scaled + s->mean;  /* a separate rounding, as in PyTorch: compiled with -ffp-contract=off */
}

/* bytes [start, end): byte i holds values 2i (high nibble) and 2i+1 (low nibble) */
static void dequantize_loop(const uint8_t *codes, const float *book, const Scales *s, int block_shift,
                            float *out, int64_t start, int64_t end) {
    for (int64_t i = start; i < end; i++) {
        float scale = block_scale(s, (2 * i) >> block_shift);
        out[2 * i] = book[codes[i] >> 4] * scale;
        out[2 * i + 1] = book[codes[i] & 15] * scale;
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_X86_LOOPS 1
/* 16 bytes -> 32 values per step. The 16 code values sit in one register, and vpermps looks up 16 indices
   at once; two more permutes interleave the high- and low-nibble values back into memory order. Needs a
   block of at least 32 values, so that the 32 share one scale, and start a multiple of 16. Returns where it
   stopped: the caller's plain loop finishes the last few bytes. */
__attribute__((target("avx512f")))
static int64_t dequantize_avx512(const uint8_t *codes, const float *book, const Scales *s, int block_shift,
                                 float *out, int64_t start, int64_t end) {
    const __m512 book_register = _mm512_loadu_ps(book);
    const __m512i first_16 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i last_16 = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i low_nibble = _mm512_set1_epi32(15);
    int64_t i = start;
    for (; i + 16 <= end; i += 16) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(codes + i)));
        __m512 high = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), book_register);
        __m512 low = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low_nibble), book_register);
        __m512 scale = _mm512_set1_ps(block_scale(s, (2 * i) >> block_shift));
        _mm512_storeu_ps(out + 2 * i, _mm512_mul_ps(_mm512_permutex2var_ps(high, first_16, low), scale));
        _mm512_storeu_ps(out + 2 * i + 16, _mm512_mul_ps(_mm512_permutex2var_ps(high, last_16, low), scale));
    }
    return i;
}

/* AVX2 registers hold 8 floats: look an index up in both halves of the book, keep the second where bit 3 is set. */
__attribute__((target("avx2")))
static inline __m256 lookup_16(__m256 book_0_7, __m256 book_8_15, __m256i index) {
    __m256 from_first = _mm256_permutevar8x32_ps(book_0_7, index);  /* uses the index's low 3 bits */
    __m256 from_second = _mm256_permutevar8x32_ps(book_8_15, index);
    return _mm256_blendv_ps(from_first, from_second, _mm256_castsi256_ps(_mm256_slli_epi32(index, 28)));
}

/* The same with AVX2, 8 bytes -> 16 values per step: blocks of at least 16 values, start a multiple of 8. */
__attribute__((target("avx2")))
static int64_t dequantize_avx2(const uint8_t *codes, const float *book, const Scales *s, int block_shift,
                               float *out, int64_t start, int64_t end) {
    const __m256 book_0_7 = _mm256_loadu_ps(book), book_8_15 = _mm256_loadu_ps(book + 8);
    const __m256i low_nibble = _mm256_set1_epi32(15);
    int64_t i = start;
    for (; i + 8 <= end; i += 8) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
        __m256 high = lookup_16(book_0_7, book_8_15, _mm256_srli_epi32(bytes, 4));
        __m256 low = lookup_16(book_0_7, book_8_15, _mm256_and_si256(bytes, low_nibble));
        __m256 pairs_0145 = _mm256_unpacklo_ps(high, low), pairs_2367 = _mm256_unpackhi_ps(high, low);
        __m256 scale = _mm256_set1_ps(block_scale(s, (2 * i) >> block_shift));
        _mm256_storeu_ps(out + 2 * i, _mm256_mul_ps(_mm256_permute2f128_ps(pairs_0145, pairs_2367, 0x20), scale));
        _mm256_storeu_ps(out + 2 * i + 8, _mm256_mul_ps(_mm256_permute2f128_ps(pairs_0145, pairs_2367, 0x31), scale));
    }
    return i;
}
#endif

/* 2: AVX-512, 1: AVX2, 0: neither (or not an x86 CPU): the plain loop only. */
int simd_level(void) {
#ifdef HAVE_X86_LOOPS
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#else
    return 0;
#endif
}

/* max_level caps the SIMD level (the tests use it to run every loop on one machine). */
void dequantize_4bit(const uint8_t *codes, int64_t n_bytes, int block_shift, const float *book,
                     const float *absmax, const uint8_t *absmax_codes, const float *absmax_code_book,
                     const float *group_scale, float mean, int group_shift, float *out, int threads, int max_level) {
    Scales s = {absmax, absmax_codes, absmax_code_book, group_scale, mean, group_shift};
    int level = simd_level();
    if (level > max_level) level = max_level;
    int64_t per_thread = (n_bytes / threads + 4095) & ~(int64_t)4095;  /* a multiple of 16 bytes */
    /* OpenMP keeps its threads between calls: starting POSIX threads on every call measured 8.7 GB/s against 11.3 */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int t = 0; t < threads; t++) {
        int64_t start = t * per_thread, end = start + per_thread < n_bytes ? start + per_thread : n_bytes;
        int64_t i = start;
        if (start >= end) continue;
#ifdef HAVE_X86_LOOPS
        if (level == 2 && block_shift >= 5) i = dequantize_avx512(codes, book, &s, block_shift, out, start, end);
        else if (level >= 1 && block_shift >= 4) i = dequantize_avx2(codes, book, &s, block_shift, out, start, end);
#endif
        dequantize_loop(codes, book, &s, block_shift, out, i, end);
    }
}
"""

SWITCH = "NANOQLORA_DEQUANTIZE_KERNEL"  # set to 0 (or false, off, no) to always run the PyTorch path
BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-ffp-contract=off"]
MIN_BYTES_PER_THREAD = 1 << 16  # below this, waking threads costs more than they save
SIMD_LOOPS = ["plain C loop", "AVX2", "AVX-512"]  # by the level the C code reports
MAX_SIMD_LEVEL = 2  # the tests lower it to run the AVX2 and plain loops on a machine that has AVX-512


def cache_dir():
    return os.environ.get("NANOQLORA_KERNEL_CACHE") or os.path.join(user_cache_dir(), "kernels")


def compile_kernel(compiler, directory):
    """Build KERNEL_SOURCE into a shared library in `directory` (once: the file name carries a hash of the source,
    compiler and flags) and load it. OpenMP first; if the compiler lacks it (Apple's clang), without it.
    Returns (ctypes library, which loop and threading it uses) or raises RuntimeError saying what failed."""
    errors = []
    for flags in (BASE_FLAGS + ["-fopenmp"], BASE_FLAGS):
        key = hashlib.sha256("\n".join([KERNEL_SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
        library = os.path.join(directory, f"dequantize_4bit-{key}.so")
        if not os.path.exists(library):
            os.makedirs(directory, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=directory) as build:  # several processes may build at once
                source = os.path.join(build, "dequantize_4bit.c")
                with open(source, "w") as f:
                    f.write(KERNEL_SOURCE)
                built = os.path.join(build, "dequantize_4bit.so")
                try:
                    result = subprocess.run([compiler, *flags, source, "-o", built], capture_output=True, text=True)
                except OSError as error:  # no such compiler
                    raise RuntimeError(f"cannot run the C compiler {compiler!r} ({error.strerror})") from None
                if result.returncode != 0:
                    errors.append(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}")
                    continue
                os.replace(built, library)  # atomic: another process never loads a half-written file
        lib = ctypes.CDLL(library)
        lib.dequantize_4bit.restype = None
        lib.dequantize_4bit.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_void_p, ctypes.c_float, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        lib.simd_level.restype = ctypes.c_int
        loop = SIMD_LOOPS[lib.simd_level()]
        threads = "OpenMP" if "-fopenmp" in flags else "one thread"
        return lib, f"C kernel ({loop}, {threads})"
    raise RuntimeError(f"{compiler} could not compile the kernel: {'; '.join(errors)}")


@functools.lru_cache(maxsize=None)
def load():
    """(the loaded library or None, which path CPU dequantization takes and why): built or found once per process."""
    if os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return None, f"PyTorch ({SWITCH}={os.environ[SWITCH]})"
    try:
        return compile_kernel(os.environ.get("CC", "cc"), cache_dir())
    except (RuntimeError, OSError) as error:  # OSError: a library that would not load
        warnings.warn(f"4-bit dequantize runs in PyTorch, about 3x slower than with the C kernel: {error}. "
                      f"Install a C compiler (or set CC), or set {SWITCH}=0 to choose the PyTorch path.", RuntimeWarning)
        return None, f"PyTorch (no C kernel: {error})"


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


def dequantize_4bit(codes, block_size, code_book, absmax, absmax_codes=None, absmax_code_book=None,
                    group_scale=None, mean=0.0, group_size=256):
    """fp32 values of `codes` (2 per byte, high nibble first) on the CPU: code_book[nibble] x scale of its block.
    code_book: 16 fp32 values. Scales: `absmax` (fp32, one per block), or None and the double-quantized form
    (absmax_codes uint8 per block, absmax_code_book of 256 fp32, group_scale fp32 per group_size blocks, mean).
    Returns a 1-D tensor of 2 x codes.numel() values, or None when the kernel is not available or the tensors have
    no storage (inside torch.func.grad, say), where the PyTorch path computes the same values."""
    lib, _ = load()
    if lib is None or not has_storage(codes):
        return None
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
