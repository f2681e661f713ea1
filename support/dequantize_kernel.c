/* 4-bit dequantize on the CPU, for support/fast_dequantize.py (an opt-in: --dequantize kernel).
   Bit-identical to quantize.dequantize_4bit: code_book[nibble] x the block's scale, one fp32 multiply. */
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
    /* OpenMP keeps its threads between calls, where POSIX threads would be started on every call */
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
