// Lossless packing of bf16 / fp32 weights for the disk offload tier: 12 bits per bf16 weight instead of 16
// (28 of 32 for fp32), bit-exact on decode, decoded by the reader threads at several GB/s per core.
//
// The 8-bit exponent of trained (and initialised) weights takes few values: a layer's weights span a few
// octaves around their scale, so the 16 most frequent exponents of a frame cover all but ~1e-4 of its
// elements. Each element is split into its exponent, coded in 4 bits against the frame's table of those 16
// exponents, and the rest of its bits (sign and mantissa) stored as they are; elements whose exponent is not
// in the table are exceptions, stored whole after the planes and patched in after the decode. A frame with
// more than max_exc exceptions is not packed (the caller stores it raw).
//
// Frame of n elements of width w (2: bf16, 4: fp32), byte offsets from the frame's start:
//   fp32 only: lo plane, n x uint16       mantissa bits 0..15
//   hi plane, n x uint8                   sign << 7 | the top 7 mantissa bits
//   codes, ceil(n / 2) x uint8            element 2j in the low nibble of byte j, 2j + 1 in the high one
//   (zero padding to a multiple of 4)
//   exception index, n_exc x uint32       ascending
//   exception value, n_exc x w bytes      the whole element
//
// Plain C ABI through ctypes (built into the same library as cpu_gemv.cpp); single-threaded: each reader
// thread decodes the frames it has read.

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>

namespace {

inline int64_t codes_offset(int64_t n, int w) { return w == 4 ? 3 * n : n; }

inline int64_t exceptions_offset(int64_t n, int w) {
    return (codes_offset(n, w) + (n + 1) / 2 + 3) / 4 * 4;
}

inline uint32_t element(const uint8_t* p, int64_t i, int w) {
    if (w == 2) {
        uint16_t v;
        memcpy(&v, p + 2 * i, 2);
        return v;
    }
    uint32_t v;
    memcpy(&v, p + 4 * i, 4);
    return v;
}

inline uint32_t exponent_of(uint32_t v, int w) { return w == 2 ? (v >> 7) & 0xff : (v >> 23) & 0xff; }

void unpack_plain(const uint8_t* src, int64_t from, int64_t n, int w, const uint8_t* table, uint8_t* dst) {
    const uint8_t* hi = src + (w == 4 ? 2 * n : 0);
    const uint8_t* codes = src + codes_offset(n, w);
    for (int64_t i = from; i < n; ++i) {
        const uint32_t e = table[(codes[i >> 1] >> ((i & 1) * 4)) & 15], h = hi[i];
        if (w == 2) {
            const uint16_t v = static_cast<uint16_t>((h & 0x80) << 8 | e << 7 | (h & 0x7f));
            memcpy(dst + 2 * i, &v, 2);
        } else {
            uint16_t lo;
            memcpy(&lo, src + 2 * i, 2);
            const uint32_t v = (h & 0x80u) << 24 | e << 23 | (h & 0x7fu) << 16 | lo;
            memcpy(dst + 4 * i, &v, 4);
        }
    }
}

// 64 elements per step: the 32 code bytes widened to one byte per element, the exponents looked up 16 at a time
// with a byte shuffle (the table sits in every 128-bit lane), the element rebuilt in 16- or 32-bit lanes.
__attribute__((target("avx512f,avx512bw")))
int64_t unpack_avx512(const uint8_t* src, int64_t n, int w, const uint8_t* table, uint8_t* dst) {
    const uint8_t* hi = src + (w == 4 ? 2 * n : 0);
    const uint8_t* codes = src + codes_offset(n, w);
    const __m512i lut = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
    const __m512i low_nibble = _mm512_set1_epi16(0x000f), high_nibble = _mm512_set1_epi16(0x0f00);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        const __m512i c = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i / 2)));
        const __m512i code = _mm512_or_si512(_mm512_and_si512(c, low_nibble),
                                             _mm512_and_si512(_mm512_slli_epi16(c, 4), high_nibble));
        const __m512i e = _mm512_shuffle_epi8(lut, code);               // 64 exponent bytes, element order
        if (w == 2) {
            const __m512i h = _mm512_loadu_si512(hi + i);
            for (int half = 0; half < 2; ++half) {
                const __m512i hw = _mm512_cvtepu8_epi16(half ? _mm512_extracti64x4_epi64(h, 1)
                                                             : _mm512_castsi512_si256(h));
                const __m512i ew = _mm512_cvtepu8_epi16(half ? _mm512_extracti64x4_epi64(e, 1)
                                                             : _mm512_castsi512_si256(e));
                const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(hw, _mm512_set1_epi16(0x80)), 8);
                const __m512i v = _mm512_or_si512(_mm512_or_si512(sign, _mm512_slli_epi16(ew, 7)),
                                                  _mm512_and_si512(hw, _mm512_set1_epi16(0x7f)));
                _mm512_storeu_si512(dst + 2 * (i + 32 * half), v);
            }
        } else {
            alignas(64) uint8_t eb[64];
            _mm512_store_si512(eb, e);
            for (int q = 0; q < 4; ++q) {
                const __m512i hd = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + i + 16 * q)));
                const __m512i ed = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(eb + 16 * q)));
                const __m512i lo = _mm512_cvtepu16_epi32(
                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * (i + 16 * q))));
                const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(hd, _mm512_set1_epi32(0x80)), 24);
                const __m512i mant = _mm512_slli_epi32(_mm512_and_si512(hd, _mm512_set1_epi32(0x7f)), 16);
                const __m512i v = _mm512_or_si512(_mm512_or_si512(sign, _mm512_slli_epi32(ed, 23)),
                                                  _mm512_or_si512(mant, lo));
                _mm512_storeu_si512(dst + 4 * (i + 16 * q), v);
            }
        }
    }
    return i;
}

// The same with 32 elements per step on AVX2 (the byte shuffle looks up within each 128-bit lane: the table
// sits in both).
__attribute__((target("avx2")))
int64_t unpack_avx2(const uint8_t* src, int64_t n, int w, const uint8_t* table, uint8_t* dst) {
    const uint8_t* hi = src + (w == 4 ? 2 * n : 0);
    const uint8_t* codes = src + codes_offset(n, w);
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
    const __m256i low_nibble = _mm256_set1_epi16(0x000f), high_nibble = _mm256_set1_epi16(0x0f00);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + i / 2)));
        const __m256i code = _mm256_or_si256(_mm256_and_si256(c, low_nibble),
                                             _mm256_and_si256(_mm256_slli_epi16(c, 4), high_nibble));
        alignas(32) uint8_t eb[32];
        _mm256_store_si256(reinterpret_cast<__m256i*>(eb), _mm256_shuffle_epi8(lut, code));
        if (w == 2) {
            for (int half = 0; half < 2; ++half) {
                const __m256i hw = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(hi + i + 16 * half)));
                const __m256i ew = _mm256_cvtepu8_epi16(_mm_load_si128(reinterpret_cast<const __m128i*>(eb + 16 * half)));
                const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(hw, _mm256_set1_epi16(0x80)), 8);
                const __m256i v = _mm256_or_si256(_mm256_or_si256(sign, _mm256_slli_epi16(ew, 7)),
                                                  _mm256_and_si256(hw, _mm256_set1_epi16(0x7f)));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * (i + 16 * half)), v);
            }
        } else {
            for (int q = 0; q < 4; ++q) {
                const __m256i hd = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(hi + i + 8 * q)));
                const __m256i ed = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(eb + 8 * q)));
                const __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * (i + 8 * q))));
                const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(hd, _mm256_set1_epi32(0x80)), 24);
                const __m256i mant = _mm256_slli_epi32(_mm256_and_si256(hd, _mm256_set1_epi32(0x7f)), 16);
                const __m256i v = _mm256_or_si256(_mm256_or_si256(sign, _mm256_slli_epi32(ed, 23)),
                                                  _mm256_or_si256(mant, lo));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 4 * (i + 8 * q)), v);
            }
        }
    }
    return i;
}

}  // namespace

extern "C" {

// Bytes a frame of n elements of width w takes with n_exc exceptions.
int64_t dsi_packed_bytes(int64_t n, int w, int64_t n_exc) {
    return exceptions_offset(n, w) + n_exc * (4 + w);
}

// Pack n elements of width w (2 or 4) from src into dst (dsi_packed_bytes(n, w, max_exc) bytes at least);
// table16 receives the frame's 16 exponents, *n_exc its exception count. Returns the packed bytes, or -1 when
// more than max_exc elements have an exponent outside the 16 most frequent ones (dst is then undefined).
int64_t dsi_pack_weights(const uint8_t* src, int64_t n, int w, int64_t max_exc, uint8_t* table16, int64_t* n_exc,
                         uint8_t* dst) {
    if (w != 2 && w != 4) return -1;
    int64_t count[256] = {0};
    for (int64_t i = 0; i < n; ++i) ++count[exponent_of(element(src, i, w), w)];
    int order[256];
    for (int k = 0; k < 256; ++k) order[k] = k;
    std::stable_sort(order, order + 256, [&](int a, int b) { return count[a] > count[b]; });
    int code[256];
    std::fill(code, code + 256, -1);
    int64_t covered = 0;
    for (int k = 0; k < 16; ++k) {
        table16[k] = static_cast<uint8_t>(order[k]);
        code[order[k]] = k;
        covered += count[order[k]];
    }
    const int64_t exc = n - covered;
    if (exc > max_exc) return -1;
    uint8_t* hi = dst + (w == 4 ? 2 * n : 0);
    uint8_t* codes = dst + codes_offset(n, w);
    const int64_t exc_at = exceptions_offset(n, w);
    memset(codes, 0, exc_at - codes_offset(n, w));
    uint8_t* exc_index = dst + exc_at;
    uint8_t* exc_value = exc_index + 4 * exc;
    int64_t k = 0;
    for (int64_t i = 0; i < n; ++i) {
        const uint32_t v = element(src, i, w);
        int c = code[exponent_of(v, w)];
        if (c < 0) {                      // an exception: any code in the planes, the element whole after them
            const uint32_t at = static_cast<uint32_t>(i);
            memcpy(exc_index + 4 * k, &at, 4);
            memcpy(exc_value + w * k, &v, w);
            ++k;
            c = 0;
        }
        codes[i >> 1] |= static_cast<uint8_t>(c << ((i & 1) * 4));
        if (w == 2) {
            hi[i] = static_cast<uint8_t>((v >> 8 & 0x80) | (v & 0x7f));
        } else {
            hi[i] = static_cast<uint8_t>((v >> 24 & 0x80) | (v >> 16 & 0x7f));
            const uint16_t lo = static_cast<uint16_t>(v & 0xffff);
            memcpy(dst + 2 * i, &lo, 2);
        }
    }
    *n_exc = exc;
    return exc_at + exc * (4 + w);
}

// Decode a frame packed by dsi_pack_weights into dst (n * w bytes). simd: the widest path to take, 2 AVX512,
// 1 AVX2, 0 the scalar loop (tests check each).
// Returns 0, or -1 when an exception index lies outside the frame (a damaged file; nothing is written there).
int dsi_unpack_weights(const uint8_t* src, int64_t n, int w, const uint8_t* table16, int64_t n_exc, uint8_t* dst,
                       int simd) {
    int64_t done = 0;
    if (simd >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        done = unpack_avx512(src, n, w, table16, dst);
    else if (simd >= 1 && __builtin_cpu_supports("avx2"))
        done = unpack_avx2(src, n, w, table16, dst);
    unpack_plain(src, done, n, w, table16, dst);
    const uint8_t* exc_index = src + exceptions_offset(n, w);
    const uint8_t* exc_value = exc_index + 4 * n_exc;
    for (int64_t k = 0; k < n_exc; ++k) {
        uint32_t at;
        memcpy(&at, exc_index + 4 * k, 4);
        if (at >= n) return -1;
        memcpy(dst + static_cast<int64_t>(at) * w, exc_value + w * k, w);
    }
    return 0;
}

}  // extern "C"
