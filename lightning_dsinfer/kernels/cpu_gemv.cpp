// bf16 linears for the CPU: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) (+ residual[M, N]), fp32 accumulation,
// bias and residual added in fp32, one rounding to bf16 (nearest even). Two kernels:
//
// dsi_gemm_amx (AMX-BF16, W re-laid out once by dsi_pack_amx): W as tiles in the order they are read, so each
// thread streams one contiguous run of memory; x is the A operand straight from memory. Any M.
//
// dsi_gemv_bf16 (W row-major, any row stride: offloaded weights are views into a streamed buffer): each
// thread owns a contiguous range of output rows, walks R = 4 rows of W side by side along K while prefetching
// the next 4 rows, and multiplies every loaded W chunk with up to 4 rows of x (x is tiny and stays in L1;
// further blocks of 4 rows of x reuse the 4 rows of W from L1/L2). Paths, chosen by the caller:
//   3  AVX512-BF16: _mm512_dpbf16_ps multiplies 32 bf16 pairs into 16 fp32 lanes.
//   2  AVX512F/BW:  bf16 widened to fp32 by a 16-bit shift, _mm512_fmadd_ps.
//   1  AVX2/FMA:    the same with 8 lanes.
//
// Every path carries a function-level target attribute, so the file builds with plain -O3 (no -march) and
// runs anywhere; dsi_gemv_best_isa says which paths this CPU has. Threads: OpenMP, which resolves to the
// libgomp torch has already loaded (same SONAME), so the kernel shares torch's thread pool instead of adding a
// second one. Plain C ABI (called through ctypes), no torch headers: the build takes about 2 s.
//
// Weight-only int8 (dsi_gemv_int8, dsi_gemm_amx_int8) and int4 group-wise (dsi_gemv_int4: nibbles to values by
// table lookups of the shifted bytes, x laid out once per call to match; dsi_gemm_amx_int4: the same lookups into
// AMX tiles; dsi_dequant_int4 for prompts' GEMMs elsewhere) weights, see their sections.
//
// Also here: one-call bf16 forms of a decode step's small ops (RMSNorm with bf16 or fp32 weights, LayerNorm, SwiGLU,
// GeGLU, GeLU / ReLU / SiLU, rotary (full or partial) + KV append, decode attention, soft-capped or not), the whole
// decode step through every block (dsi_decode_stack), and the shared-memory all-reduce exchange of parallel/shm.py.

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <vector>

extern "C" int dsi_gemv_best_isa(void);

namespace {

// Work below which a call stays on the calling thread whatever `threads` says (the OpenMP fork/join would cost
// more than the split saves): N * K of a linear, B * Hq * L * D of a decode attention.
constexpr int64_t kSerialLinearWork = 1 << 16;
constexpr int64_t kSerialAttentionWork = 1 << 20;
// Elements below which a plain activation (dsi_act_bf16) stays on the calling thread: GeLU costs ~0.8 ns an element
// on one core, so 16k elements (~13 us) repay a fork/join.
constexpr int64_t kSerialActWork = 1 << 14;
// Rows of x up to which dsi_gemm_amx_int8 multiplies int8 tiles widened to fp32 instead of running tile products.
// (4096 x 22016 weight, 2 threads: 3.1-3.4 ms at 1 row, 3.3-3.8 at 2, against 4.4-4.9 with tile products and
// 6.0-6.5 for bf16 tiles; from 3 rows on the tile products are as fast or faster.)
constexpr int64_t kInt8TileGemvRows = 2;
// Rows of x up to which dsi_gemv_int4 takes its AVX512-BF16 path (4 dot products per row and 128 weights) rather than
// the fp32 one (8 FMAs, twice the table lookups). Measured on the 2-core AVX512-BF16 machine (4096 x 11008 and
// 11008 x 4096 weights, 2 threads): 1 row 1.05 / 1.40 ms either way, 2 rows 1.50 / 1.63 against 1.38 / 1.59, 16 rows
// 10.2 / 9.9 against 8.1 / 8.5: this CPU's bf16 dot products are no faster than two fp32 FMAs.
constexpr int64_t kInt4Bf16Rows = 1;

// The first min(max(n, 0), 16) lanes of a 16-lane mask (a row's tail: n elements left).
inline __mmask16 lanes16(int64_t n) {
    return n >= 16 ? static_cast<__mmask16>(0xffff) : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

inline float bf16_to_f32(uint16_t h) {
    uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

// While rows [n0, n0 + R) are read, the same positions of rows [n0 + R, n0 + 2R) are prefetched into L2: the
// next group's lines arrive in the order they will be used, so the loads of every group hit L2 (the hardware
// prefetcher alone restarts at each group and leaves this loop latency-bound: ~0.5 of streaming bandwidth).
template <int R, typename T>
inline void prefetch_next_group(const T* wr, int64_t ldw, int64_t k) {
    for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(wr + (R + r) * ldw + k), _MM_HINT_T1);
}

struct Args {
    const uint16_t* x; int64_t ldx;        // activations [M, K], row stride ldx (elements)
    const uint16_t* w; int64_t ldw;        // weight [N, K], row stride ldw
    const uint16_t* bias;                  // [N] or null
    const uint16_t* res; int64_t ldr;      // residual [M, N], row stride ldr, or null
    uint16_t* y; int64_t ldy;              // output [M, N], row stride ldy
    int64_t N, K;
    const float* scale = nullptr;          // int8 weights (w then points to int8): fp32 scale per output row
    Args shift(int64_t m0) const {  // the same problem from row m0 of x / residual / y on
        return Args{x + m0 * ldx, ldx, w, ldw, bias, res ? res + m0 * ldr : nullptr, ldr, y + m0 * ldy, ldy, N, K, scale};
    }
};

// y[m, n] from the dot product of x row m with W row n: (* scale[n] for int8 weights) + bias[n] (+ res[m, n]),
// rounded once to bf16. The one epilogue of the row-major kernels and of tile_gemv_int8.
inline void store_out(const Args& a, int64_t m, int64_t n, float sum) {
    float v = (a.scale ? sum * a.scale[n] : sum) + (a.bias ? bf16_to_f32(a.bias[n]) : 0.f);
    if (a.res) v += bf16_to_f32(a.res[m * a.ldr + n]);
    a.y[m * a.ldy + n] = f32_to_bf16(v);
}

// Epilogue shared by the paths: sums[m * R + r] is the dot product of x row m with W row n0 + r.
template <int M, int R>
inline void store_rows(const Args& a, int64_t n0, const float* sums) {
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) store_out(a, m, n0 + r, sums[m * R + r]);
}

// ---------------------------------------------------------------- AVX512-BF16
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void rows_bf16(const Args& a, int64_t n0) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const uint16_t* wr = a.w + n0 * a.ldw;
    int64_t k = 0;
    for (; k + 32 <= a.K; k += 32) {
        __m512i w[R];
        for (int r = 0; r < R; ++r) w[r] = _mm512_loadu_si512(wr + r * a.ldw + k);
        prefetch_next_group<R>(wr, a.ldw, k);
        for (int m = 0; m < M; ++m) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(a.x + m * a.ldx + k);
            for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)w[r]);
        }
    }
    if (k < a.K) {  // tail: masked loads give zeros past K
        const __mmask32 mask = static_cast<__mmask32>((1ull << (a.K - k)) - 1);
        __m512i w[R];
        for (int r = 0; r < R; ++r) w[r] = _mm512_maskz_loadu_epi16(mask, wr + r * a.ldw + k);
        for (int m = 0; m < M; ++m) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, a.x + m * a.ldx + k);
            for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)w[r]);
        }
    }
    float sums[M * R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
    store_rows<M, R>(a, n0, sums);
}

// ---------------------------------------------------------------- AVX512F (bf16 widened to fp32)
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen16_mask(const uint16_t* p, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

// int8 weights (weight-only): a.w points to q int8 [N, K], a.scale to one fp32 scale per output row (the epilogue
// multiplies the row's sum by it); each int8 is widened to fp32. A decode step reads half the bytes of bf16.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen_i8(const int8_t* p, __mmask16 mask) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, p)));
}

// 16 weights of a row widened to fp32: bf16 (a shift) or int8 (a sign extension and a conversion).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen_w(const uint16_t* p) { return widen16(p); }
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen_w(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen_w(const uint16_t* p, __mmask16 mask) { return widen16_mask(p, mask); }
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 widen_w(const int8_t* p, __mmask16 mask) { return widen_i8(p, mask); }

// T = uint16_t: bf16 weights; T = int8_t: int8 weights (with a.scale). x is bf16 either way.
template <int M, int R, typename T>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_avx512(const Args& a, int64_t n0) {
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const T* wr = reinterpret_cast<const T*>(a.w) + n0 * a.ldw;
    int64_t k = 0;
    for (; k + 16 <= a.K; k += 16) {
        __m512 w[R];
        for (int r = 0; r < R; ++r) w[r] = widen_w(wr + r * a.ldw + k);
        if (((k * sizeof(T)) & 63) == 0) prefetch_next_group<R>(wr, a.ldw, k);     // once per cache line
        for (int m = 0; m < M; ++m) {
            const __m512 xv = widen16(a.x + m * a.ldx + k);
            for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, w[r], acc[m][r]);
        }
    }
    if (k < a.K) {
        const __mmask16 mask = lanes16(a.K - k);
        __m512 w[R];
        for (int r = 0; r < R; ++r) w[r] = widen_w(wr + r * a.ldw + k, mask);
        for (int m = 0; m < M; ++m) {
            const __m512 xv = widen16_mask(a.x + m * a.ldx + k, mask);
            for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(xv, w[r], acc[m][r]);
        }
    }
    float sums[M * R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
    store_rows<M, R>(a, n0, sums);
}

// ---------------------------------------------------------------- AVX2 + FMA
__attribute__((target("avx2,fma")))
inline __m256 widen8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

__attribute__((target("avx2,fma")))
inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

template <int M, int R>
__attribute__((target("avx2,fma")))
void rows_avx2(const Args& a, int64_t n0) {
    __m256 acc[M][R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
    const uint16_t* wr = a.w + n0 * a.ldw;
    int64_t k = 0;
    for (; k + 8 <= a.K; k += 8) {
        __m256 w[R];
        for (int r = 0; r < R; ++r) w[r] = widen8(wr + r * a.ldw + k);
        if ((k & 31) == 0) prefetch_next_group<R>(wr, a.ldw, k);
        for (int m = 0; m < M; ++m) {
            const __m256 xv = widen8(a.x + m * a.ldx + k);
            for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(xv, w[r], acc[m][r]);
        }
    }
    float sums[M * R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) sums[m * R + r] = hsum8(acc[m][r]);
    for (; k < a.K; ++k)  // scalar tail (K % 8)
        for (int m = 0; m < M; ++m)
            for (int r = 0; r < R; ++r)
                sums[m * R + r] += bf16_to_f32(a.x[m * a.ldx + k]) * bf16_to_f32(wr[r * a.ldw + k]);
    store_rows<M, R>(a, n0, sums);
}

// ---------------------------------------------------------------- AMX-BF16 on the packed layout, any M
// Packed weight ("AMX layout"): W [N, K] zero-padded to Np = ceil32(N) rows and Kp = ceil32(K) columns, cut into
// tiles of 16 rows x 32 columns stored as 16 rows of k-pairs, each row holding the 16 outputs' pairs:
//     tile(nb, kc)[p][j][q] = W[16 nb + j, 32 kc + 2 p + q]      (1 KiB, the VNNI order of an AMX B operand)
// with the Kp / 32 tiles of a block of 16 rows one after another, blocks in row order. A thread's rows are
// one contiguous run of memory, read front to back: the stream the hardware prefetcher does best.
//
// C[m, n] = sum_k x[m, k] W[n, k]: x is the A operand, loaded as tiles of up to 16 rows x 32 columns straight
// from x (row stride ldx), W tiles are B operands. Two blocks of 16 outputs (32 rows of W) x up to two blocks of
// 16 rows of x make four C tiles; M > 32 walks further blocks of x over the same 32 rows of W (now in L1/L2).
// When M > 16 is not a multiple of 16 the last block of x starts at M - 16 and overlaps the one before it (its
// rows are computed twice, identically), so x is never padded; only K % 32 != 0 copies x into zero-padded rows.
struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

#define DSI_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))

// Tiles 0-3: C (x block i, W block j) at 2 i + j; 4, 5: A (x blocks); 6, 7: B (W blocks).
DSI_AMX_TARGET void amx_config(int rows_x) {
    TileConfig c;
    for (int t = 0; t < 6; ++t) {
        c.rows[t] = static_cast<uint8_t>(rows_x);   // C: rows of x x 16 outputs (fp32); A: rows of x x 32 bf16
        c.colsb[t] = 64;
    }
    c.rows[6] = c.rows[7] = 16;                     // B: 16 k-pairs x 16 outputs x 2
    c.colsb[6] = c.colsb[7] = 64;
    // Own asm with the whole struct as the operand: GCC 12's _tile_loadconfig declares an 8-byte operand, so
    // the stores to the rest of the config can be dropped as dead.
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
}

// y rows [m0, m0 + rows) x outputs [n0, n0 + 16) from a stored C tile (fp32, 16 floats per row), + bias + residual.
DSI_AMX_TARGET void amx_epilogue(const Args& a, const float* c, int rows, int64_t m0, int64_t n0) {
    if (n0 >= a.N) return;
    const __mmask16 mask = lanes16(a.N - n0);
    const __m512 b = a.bias ? widen16_mask(a.bias + n0, mask) : _mm512_setzero_ps();
    const __m512 s = a.scale ? _mm512_maskz_loadu_ps(mask, a.scale + n0) : _mm512_set1_ps(1.f);
    for (int r = 0; r < rows; ++r) {
        __m512 v = a.scale ? _mm512_fmadd_ps(_mm512_loadu_ps(c + 16 * r), s, b) : _mm512_add_ps(_mm512_loadu_ps(c + 16 * r), b);
        if (a.res) v = _mm512_add_ps(v, widen16_mask(a.res + (m0 + r) * a.ldr + n0, mask));
        _mm256_mask_storeu_epi16(a.y + (m0 + r) * a.ldy + n0, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// C tiles of one step stored to memory, waiting for their epilogue.
struct AmxPending {
    alignas(64) float c[4][256];
    int64_t m0 = 0, m1 = 0, n0 = 0;
    int rows0 = 0, count = 0;        // count: 0 (nothing pending), 2 or 4 tiles
};

DSI_AMX_TARGET inline void amx_flush(const Args& a, const AmxPending& p) {
    if (p.count == 0) return;
    amx_epilogue(a, p.c[0], p.rows0, p.m0, p.n0);
    amx_epilogue(a, p.c[1], p.rows0, p.m0, p.n0 + 16);
    if (p.count == 4) {
        amx_epilogue(a, p.c[2], 16, p.m1, p.n0);
        amx_epilogue(a, p.c[3], 16, p.m1, p.n0 + 16);
    }
}

// int8 tiles (dsi_pack_amx_int8: the same order, one byte per element) widened to bf16 tiles: |q| <= 127 is exact.
DSI_AMX_TARGET void widen_tiles(const int8_t* src, uint16_t* dst, int64_t tiles) {
    for (int64_t i = 0; i < tiles * 512; i += 32) {
        const __m512i w16 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w16)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w16, 1)));
        _mm512_store_si512(dst + i, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

// Outputs [32 q_begin, 32 q_end) for rows [m_begin, m_begin + M) of x (a.x has row stride a.ldx and >= Kp
// readable columns). Tile config loaded by the caller for min(M, 16) rows. The epilogue of each step runs after
// the next step's tile instructions are issued, so it overlaps them (two buffers of stored C tiles).
// I8: a.w holds int8 tiles; the 2 x Kp / 32 tiles of each 32 rows are widened to bf16 once, into `wide`.
template <bool I8>
DSI_AMX_TARGET void amx_block(const Args& a, int64_t m_begin, int64_t M, int64_t Kp, int64_t q_begin, int64_t q_end,
                              uint16_t* wide) {
    const int rows_x = M < 16 ? static_cast<int>(M) : 16;
    const int64_t kc_n = Kp / 32, lda = a.ldx * 2;
    const int64_t blocks = M <= 16 ? 1 : (M + 15) / 16;   // blocks of x rows; the last one starts at M - 16
    AmxPending pend[2];
    int cur = 0;
    for (int64_t q = q_begin; q < q_end; ++q) {
        const uint16_t* b0 = a.w + 2 * q * kc_n * 512;     // W rows 32 q .. 32 q + 15
        const int8_t* q0 = reinterpret_cast<const int8_t*>(a.w) + 2 * q * kc_n * 512;
        // int8: up to 32 rows of x (one pass over k), each k step's two tiles are widened right before use (an L1
        // buffer); more rows walk k several times, so the 32 rows' tiles are widened once for all of them.
        const bool inline_widen = I8 && blocks <= 2;
        if (I8 && !inline_widen) {
            widen_tiles(q0, wide, 2 * kc_n);
            b0 = wide;
        }
        const uint16_t* b1 = b0 + kc_n * 512;              // W rows 32 q + 16 .. 32 q + 31
        for (int64_t i = 0; i < blocks; i += 2) {
            const bool two = i + 1 < blocks;
            const int64_t m0 = m_begin + (i * 16 + rows_x <= M ? i * 16 : M - rows_x);
            const int64_t m1 = m_begin + ((i + 1) * 16 + 16 <= M ? (i + 1) * 16 : M - 16);
            const uint16_t* x0 = a.x + m0 * a.ldx;
            const uint16_t* x1 = a.x + m1 * a.ldx;
            _tile_zero(0);
            _tile_zero(1);
            if (two) {
                _tile_zero(2);
                _tile_zero(3);
            }
            for (int64_t kc = 0; kc < kc_n; ++kc) {
                if (inline_widen) {
                    widen_tiles(q0 + kc * 512, wide, 1);
                    widen_tiles(q0 + (kc_n + kc) * 512, wide + 512, 1);
                    _tile_loadd(6, wide, 64);
                    _tile_loadd(7, wide + 512, 64);
                } else {
                    _tile_loadd(6, b0 + kc * 512, 64);
                    _tile_loadd(7, b1 + kc * 512, 64);
                }
                _tile_loadd(4, x0 + kc * 32, lda);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                if (two) {
                    _tile_loadd(5, x1 + kc * 32, lda);
                    _tile_dpbf16ps(2, 5, 6);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            amx_flush(a, pend[cur ^ 1]);                   // the previous step, while these tiles compute
            AmxPending& p = pend[cur];
            _tile_stored(0, p.c[0], 64);
            _tile_stored(1, p.c[1], 64);
            if (two) {
                _tile_stored(2, p.c[2], 64);
                _tile_stored(3, p.c[3], 64);
            }
            p.m0 = m0, p.m1 = m1, p.n0 = 32 * q, p.rows0 = rows_x, p.count = two ? 4 : 2;
            pend[cur ^ 1].count = 0;
            cur ^= 1;
        }
    }
    amx_flush(a, pend[cur ^ 1]);
}

// All M rows of x, outputs [32 q_begin, 32 q_end). Large M goes in chunks of rows whose x slice fits in L2
// (about 1 MiB): every 32 rows of W then meet the chunk from L2, and W is read once per chunk.
template <bool I8>
DSI_AMX_TARGET void amx_range(const Args& a, int64_t M, int64_t Kp, int64_t q_begin, int64_t q_end) {
    const int64_t chunk = M <= 32 ? M : std::max<int64_t>(32, (int64_t{1} << 20) / (Kp * 2) / 32 * 32);
    static thread_local std::vector<uint16_t, std::allocator<uint16_t>> wide_buf;
    uint16_t* wide = nullptr;
    if (I8) {
        wide_buf.resize(static_cast<size_t>(2 * Kp * 16 + 32));
        wide = wide_buf.data() + ((64 - reinterpret_cast<uintptr_t>(wide_buf.data()) % 64) % 64) / 2;   // 64-byte aligned
    }
    amx_config(M < 16 ? static_cast<int>(M) : 16);
    for (int64_t m = 0; m < M; m += chunk) {
        int64_t rows = std::min(chunk, M - m);
        if (rows < 16 && M >= 16) {  // a short last chunk: start it earlier (overlap) to keep 16-row tiles
            m = M - 16;
            rows = 16;
        }
        amx_block<I8>(a, m, rows, Kp, q_begin, q_end, wide);
    }
    _tile_release();
}

// A few rows of x over int8 tiles without AMX: a tile's 32 bytes for k-pair p hold (row j, k 2p + q) for the 16
// rows j and q = 0, 1; widened to fp32 (two 16-lane vectors) and multiplied by the pair (x[2p], x[2p + 1])
// broadcast across the lanes, the pairs summed at the end. Widening int8 to fp32 costs what the row-major int8
// kernel pays; the bf16 widening the tile products need costs more, which one or two rows of x do not repay.
// Outputs [32 q_begin, 32 q_end); xf: the M rows of x in fp32, Kp columns each (zero past K).
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void tile_gemv_int8(const Args& a, const float* xf, int64_t Kp, int64_t q_begin, int64_t q_end) {
    const int64_t kc_n = Kp / 32;
    const int8_t* w = reinterpret_cast<const int8_t*>(a.w);
    for (int64_t nb = 2 * q_begin; nb < 2 * q_end; ++nb) {        // blocks of 16 output rows
        if (nb * 16 >= a.N) break;
        __m512 acc[M][4];                    // (rows 0-7 | 8-15) x (even | odd k pair): four independent sums
        for (int m = 0; m < M; ++m)
            for (int i = 0; i < 4; ++i) acc[m][i] = _mm512_setzero_ps();
        const int8_t* t = w + nb * kc_n * 512;
        for (int64_t p = 0; p < kc_n * 16; p += 2) {              // k pairs, tile after tile (16 per tile)
            _mm_prefetch(reinterpret_cast<const char*>(t + 32 * p + 2048), _MM_HINT_T0);
            __m512 wv[4];                     // pairs p and p + 1: 16 bytes each, sign-extended straight from memory
            for (int i = 0; i < 4; ++i)       // (no 512-bit load + lane extracts: one shuffle less per 16 weights)
                wv[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                    _mm_loadu_si128(reinterpret_cast<const __m128i*>(t + 32 * p + 16 * i))));
            const int64_t k = (p / 16) * 32 + 2 * (p % 16);
            for (int m = 0; m < M; ++m) {
                double pair0, pair1;
                memcpy(&pair0, xf + m * Kp + k, 8);
                memcpy(&pair1, xf + m * Kp + k + 2, 8);
                const __m512 x0 = _mm512_castpd_ps(_mm512_set1_pd(pair0)), x1 = _mm512_castpd_ps(_mm512_set1_pd(pair1));
                acc[m][0] = _mm512_fmadd_ps(wv[0], x0, acc[m][0]);
                acc[m][1] = _mm512_fmadd_ps(wv[1], x0, acc[m][1]);
                acc[m][2] = _mm512_fmadd_ps(wv[2], x1, acc[m][2]);
                acc[m][3] = _mm512_fmadd_ps(wv[3], x1, acc[m][3]);
            }
        }
        for (int m = 0; m < M; ++m) {
            alignas(64) float s[32];
            _mm512_store_ps(s, _mm512_add_ps(acc[m][0], acc[m][2]));
            _mm512_store_ps(s + 16, _mm512_add_ps(acc[m][1], acc[m][3]));
            for (int j = 0; j < 16 && nb * 16 + j < a.N; ++j) store_out(a, m, nb * 16 + j, s[2 * j] + s[2 * j + 1]);
        }
    }
}

// ---------------------------------------------------------------- dispatch
// 4 rows of W x up to 4 rows of x: 16 accumulators + 4 weight registers fit the 32 AVX512 registers (the AVX2
// path spills some of its 16 + 4 to L1, which costs little next to the memory stream it waits on).

constexpr int kInt8Rows = -1;   // run_range's "isa" for int8 weights (rows_avx512 on int8, AVX512)

template <int M, int R>
inline void call_rows(int isa, const Args& a, int64_t n) {
    if (isa == kInt8Rows) rows_avx512<M, R, int8_t>(a, n);
    else if (isa == 3) rows_bf16<M, R>(a, n);
    else if (isa == 2) rows_avx512<M, R, uint16_t>(a, n);
    else rows_avx2<M, R>(a, n);
}

template <int R>
inline void call_mgroup(int isa, int mb, const Args& a, int64_t n) {
    switch (mb) {
        case 1: call_rows<1, R>(isa, a, n); break;
        case 2: call_rows<2, R>(isa, a, n); break;
        case 3: call_rows<3, R>(isa, a, n); break;
        default: call_rows<4, R>(isa, a, n); break;
    }
}

// Rows [n_begin, n_end) of the output for all M rows of x: R = 4 rows of W at a time, and for each group of
// rows every block of 4 rows of x (the group was just read from memory: the next x blocks find it in L1/L2).
void run_range(int isa, int64_t M, const Args& a, int64_t n_begin, int64_t n_end) {
    constexpr int R = 4;
    int64_t n = n_begin;
    for (; n + R <= n_end; n += R) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const Args s = a.shift(m0);
            call_mgroup<R>(isa, static_cast<int>(M - m0 < 4 ? M - m0 : 4), s, n);
        }
    }
    for (; n < n_end; ++n)
        for (int64_t m0 = 0; m0 < M; m0 += 4)
            call_mgroup<1>(isa, static_cast<int>(M - m0 < 4 ? M - m0 : 4), a.shift(m0), n);
}

// Rows [0, N) over `threads` OpenMP threads in contiguous ranges, boundaries on multiples of 8 rows (whole
// R-groups, whole cache lines of y): fn(n_begin, n_end) on each. One thread: no parallel region at all.
template <typename F>
void split_rows(int threads, int64_t N, F&& fn) {
    if (threads <= 1) {
        fn(int64_t{0}, N);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t groups = (N + 7) / 8;
        const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
        const int64_t n_begin = g0 * 8, n_end = g1 * 8 < N ? g1 * 8 : N;
        if (n_begin < n_end) fn(n_begin, n_end);
    }
}

// ---------------------------------------------------------------- int4 group-wise weights (weight-only)
// Layout (reference.quantize_int4_groupwise): packed uint8 [N, K / 2] (row stride ldw bytes), byte i of a row =
// q[2i] | q[2i + 1] << 4 with q = round(w / s) + 8 in [0, 15]; scales fp32 [N, K / G] (row stride lds):
// w[n, k] ~= (q[n, k] - 8) * scale[n, k / G]. A decode step reads a quarter of bf16's bytes (+ 4 / G per weight).
//
// The weight is read in chunks of 128 inputs: 64 bytes, one cache line of a row. Nibbles become values by table
// lookups whose index is the chunk shifted, never moved into place: seen as 32 words, word j of the chunk holds
// the nibbles of inputs 4j .. 4j + 3, so P_i = vpermw(chunk >> 4i, T) has in word j the bf16 value of input
// 4j + i (q - 8 in [-8, 7] is exact in bf16; vpermw reads an index's low 5 bits, so T holds its 16 values twice
// and the neighbouring nibble's bit is ignored). 3 shifts and 4 permutes per 128 weights; x is laid out to match
// once per call (xr word 32 i + j of a chunk = x[4j + i]), so _mm512_dpbf16_ps(P_i, xr_i) multiplies pairs of the
// same inputs. fp32 lane l of the products then covers inputs 8l .. 8l + 7 of the chunk, so one group's lanes
// are whole for G = 8 .. 64 (G / 8 lanes each) and G >= 128 (all of them, G a multiple of 128): the chunk's sums
// are multiplied by a vector of the lanes' group scales and added to fp32 accumulators (one FMA per chunk).
// Without AVX512-BF16 the same trick gives fp32 values: seen as 16 dwords, F_i = vpermps(chunk >> 4i, Tf) holds
// input 8d + i in lane d (8 shifts and 8 permutes per 128 weights), against x laid out as fp32 (xr lane 16 i + d
// of a chunk = x[8d + i]). Padding past K (K % 128 inputs) reads zero bytes (value -8) against zero x: adds 0.
struct Int4Args {
    const void* x; int64_t ldx;            // x laid out per chunk (bf16 or fp32, see above), [M, ceil128(K)]
    const uint8_t* w; int64_t ldw;         // packed [N, K / 2], row stride ldw bytes
    const float* scale; int64_t lds, G;    // scales [N, K / G], row stride lds; group size G
    const uint16_t* bias;                  // [N] or null
    const uint16_t* res; int64_t ldr;      // residual [M, N], row stride ldr, or null
    uint16_t* y; int64_t ldy;              // output [M, N] bf16, row stride ldy
    int64_t N, K;
    Int4Args shift(int64_t m0, int64_t xw) const {   // rows from m0 on (xw: bytes per element of the laid out x)
        return Int4Args{static_cast<const char*>(x) + m0 * ldx * xw, ldx, w, ldw, scale, lds, G, bias,
                        res ? res + m0 * ldr : nullptr, ldr, y + m0 * ldy, ldy, N, K};
    }
};

inline bool int4_group_ok(int64_t G) { return G == 8 || G == 16 || G == 32 || G == 64 || (G > 0 && G % 128 == 0); }

// The scales of the 16 fp32 lanes of chunk k0 (lane l: inputs k0 + 8l .. k0 + 8l + 7, group (k0 + 8l) / G) of the
// row's scales s; groups past K read as 0.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 int4_lane_scales(const float* s, int64_t k0, int64_t G, int64_t K) {
    if (G >= 128) return _mm512_set1_ps(s[k0 / G]);
    const int64_t groups = std::min<int64_t>(128 / G, (K - k0) / G);
    const __m512 raw = _mm512_maskz_loadu_ps(lanes16(groups), s + k0 / G);
    if (G == 8) return raw;
    const int sh = G == 16 ? 1 : G == 32 ? 2 : 3;                  // lane l -> group l / (G / 8)
    return _mm512_permutexvar_ps(_mm512_srli_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13,
                                                                      14, 15), sh), raw);
}

// bytes of chunk c of a row (64, or fewer at the end of a row whose K is not a multiple of 128).
inline __mmask64 int4_chunk_mask(int64_t K, int64_t k0) {
    const int64_t bytes = (K - k0) / 2;
    return bytes >= 64 ? ~0ull : (1ull << bytes) - 1;
}

inline void int4_store_rows(const Int4Args& a, int64_t n0, int M, int R, const float* sums) {
    for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
            const int64_t n = n0 + r;
            float v = sums[m * R + r] + (a.bias ? bf16_to_f32(a.bias[n]) : 0.f);
            if (a.res) v += bf16_to_f32(a.res[m * a.ldr + n]);
            a.y[m * a.ldy + n] = f32_to_bf16(v);
        }
}

// One chunk (inputs k0 .. k0 + 127; `bytes`: its bytes in the row) of R rows of W against M rows of x.
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline))
inline void int4_chunk_bf16(const Int4Args& a, __m512 (&acc)[M][R], const uint8_t* wr, const float* sr,
                            const uint16_t* xr, __m512i table, int64_t k0, __mmask64 bytes) {
    const int64_t b0 = k0 / 2;
    prefetch_next_group<R>(wr, a.ldw, b0);
    for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_maskz_loadu_epi8(bytes, wr + r * a.ldw + b0);
        const __m512i p0 = _mm512_permutexvar_epi16(v, table);
        const __m512i p1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
        const __m512i p2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table);
        const __m512i p3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table);
        const __m512 s = int4_lane_scales(sr + r * a.lds, k0, a.G, a.K);
        for (int m = 0; m < M; ++m) {
            const uint16_t* xm = xr + m * a.ldx + k0;
            __m512 g = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)_mm512_loadu_si512(xm), (__m512bh)p0);
            g = _mm512_dpbf16_ps(g, (__m512bh)_mm512_loadu_si512(xm + 32), (__m512bh)p1);
            g = _mm512_dpbf16_ps(g, (__m512bh)_mm512_loadu_si512(xm + 64), (__m512bh)p2);
            g = _mm512_dpbf16_ps(g, (__m512bh)_mm512_loadu_si512(xm + 96), (__m512bh)p3);
            acc[m][r] = _mm512_fmadd_ps(g, s, acc[m][r]);
        }
    }
}

// AVX512-BF16: M rows of x (laid out bf16) x R rows of W from n0.
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void rows_int4_bf16(const Int4Args& a, int64_t n0) {
    alignas(64) static const uint16_t kTable[32] = {   // bf16 of -8 .. 7, twice
        0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080,
        0x40A0, 0x40C0, 0x40E0, 0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80, 0x0000, 0x3F80,
        0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};
    const __m512i table = _mm512_load_si512(kTable);
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const uint8_t* wr = a.w + n0 * a.ldw;
    const float* sr = a.scale + n0 * a.lds;
    const uint16_t* xr = static_cast<const uint16_t*>(a.x);
    const int64_t full = a.K / 128 * 128;
    for (int64_t k0 = 0; k0 < full; k0 += 128) int4_chunk_bf16<M, R>(a, acc, wr, sr, xr, table, k0, ~0ull);
    if (full < a.K) int4_chunk_bf16<M, R>(a, acc, wr, sr, xr, table, full, int4_chunk_mask(a.K, full));
    float sums[M * R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
    int4_store_rows(a, n0, M, R, sums);
}

template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline))
inline void int4_chunk_f32(const Int4Args& a, __m512 (&acc)[M][R], const uint8_t* wr, const float* sr,
                           const float* xr, __m512 table, int64_t k0, __mmask64 bytes) {
    const int64_t b0 = k0 / 2;
    prefetch_next_group<R>(wr, a.ldw, b0);
    for (int r = 0; r < R; ++r) {
        const __m512i v = _mm512_maskz_loadu_epi8(bytes, wr + r * a.ldw + b0);
        __m512 f[8];
        f[0] = _mm512_permutexvar_ps(v, table);
        for (int i = 1; i < 8; ++i) f[i] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * i), table);
        const __m512 s = int4_lane_scales(sr + r * a.lds, k0, a.G, a.K);
        for (int m = 0; m < M; ++m) {
            const float* xm = xr + m * a.ldx + k0;
            __m512 g = _mm512_mul_ps(_mm512_loadu_ps(xm), f[0]);
            for (int i = 1; i < 8; ++i) g = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16 * i), f[i], g);
            acc[m][r] = _mm512_fmadd_ps(g, s, acc[m][r]);
        }
    }
}

// AVX512F: the same with fp32 values (x laid out fp32).
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void rows_int4_f32(const Int4Args& a, int64_t n0) {
    const __m512 table = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f,
                                        6.f, 7.f);
    __m512 acc[M][R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
    const uint8_t* wr = a.w + n0 * a.ldw;
    const float* sr = a.scale + n0 * a.lds;
    const float* xr = static_cast<const float*>(a.x);
    const int64_t full = a.K / 128 * 128;
    for (int64_t k0 = 0; k0 < full; k0 += 128) int4_chunk_f32<M, R>(a, acc, wr, sr, xr, table, k0, ~0ull);
    if (full < a.K) int4_chunk_f32<M, R>(a, acc, wr, sr, xr, table, full, int4_chunk_mask(a.K, full));
    float sums[M * R];
    for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) sums[m * R + r] = _mm512_reduce_add_ps(acc[m][r]);
    int4_store_rows(a, n0, M, R, sums);
}

template <int M, int R>
inline void call_rows_int4(int isa, const Int4Args& a, int64_t n) {
    if (isa == 3) rows_int4_bf16<M, R>(a, n);
    else rows_int4_f32<M, R>(a, n);
}

template <int R>
inline void call_mgroup_int4(int isa, int mb, const Int4Args& a, int64_t n) {
    switch (mb) {
        case 1: call_rows_int4<1, R>(isa, a, n); break;
        case 2: call_rows_int4<2, R>(isa, a, n); break;
        case 3: call_rows_int4<3, R>(isa, a, n); break;
        default: call_rows_int4<4, R>(isa, a, n); break;
    }
}

// Rows [n_begin, n_end) of the output for all M rows of x, as run_range: 4 rows of W at a time, blocks of up to 4
// rows of x over them (a block after the first finds the 4 rows' chunks in L1 / L2 and decodes them again).
void run_range_int4(int isa, int64_t M, const Int4Args& a, int64_t n_begin, int64_t n_end) {
    constexpr int R = 4;
    const int64_t xw = isa == 3 ? 2 : 4;
    int64_t n = n_begin;
    for (; n + R <= n_end; n += R)
        for (int64_t m0 = 0; m0 < M; m0 += 4)
            call_mgroup_int4<R>(isa, static_cast<int>(M - m0 < 4 ? M - m0 : 4), a.shift(m0, xw), n);
    for (; n < n_end; ++n)
        for (int64_t m0 = 0; m0 < M; m0 += 4)
            call_mgroup_int4<1>(isa, static_cast<int>(M - m0 < 4 ? M - m0 : 4), a.shift(m0, xw), n);
}

// x [M, K] bf16 (row stride ldx) laid out for rows_int4_bf16 into out [M, Kp] (Kp = ceil128(K), zero past K):
// per chunk, word 32 i + j = x[4j + i]. Two-source word permutes over the chunk's 4 vectors.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void layout_x_int4_bf16(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, uint16_t* out) {
    const int64_t Kp = (K + 127) / 128 * 128;
    alignas(64) uint16_t idx[4][32];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 32; ++j) idx[i][j] = static_cast<uint16_t>(j < 16 ? 4 * j + i : 0);
    for (int64_t m = 0; m < M; ++m) {
        const uint16_t* xm = x + m * ldx;
        uint16_t* om = out + m * Kp;
        for (int64_t k0 = 0; k0 < Kp; k0 += 128) {
            __m512i v[4];
            for (int q = 0; q < 4; ++q)
                v[q] = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(
                    K - k0 - 32 * q >= 32 ? 0xffffffffu : K - k0 - 32 * q <= 0 ? 0u : (1u << (K - k0 - 32 * q)) - 1),
                    xm + k0 + 32 * q);
            for (int i = 0; i < 4; ++i) {
                const __m512i id = _mm512_load_si512(idx[i]);
                const __m512i lo = _mm512_permutex2var_epi16(v[0], id, v[1]);   // inputs 0 .. 63: words j < 16
                const __m512i hi = _mm512_permutex2var_epi16(v[2], id, v[3]);   // inputs 64 .. 127
                _mm512_storeu_si512(om + k0 + 32 * i, _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1));
            }
        }
    }
}

// The same for rows_int4_f32: fp32, per chunk lane 16 i + d = x[8d + i].
void layout_x_int4_f32(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, float* out) {
    const int64_t Kp = (K + 127) / 128 * 128;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k0 = 0; k0 < Kp; k0 += 128)
            for (int i = 0; i < 8; ++i)
                for (int d = 0; d < 16; ++d) {
                    const int64_t k = k0 + 8 * d + i;
                    out[m * Kp + k0 + 16 * i + d] = k < K ? bf16_to_f32(x[m * ldx + k]) : 0.f;
                }
}

// ---------------------------------------------------------------- AMX-BF16 over int4 group-wise weights
// (G a multiple of 128.) The row-major int4 weight is the A operand: each thread decodes a chunk (128 inputs) of 32
// of its rows at a time into an L1 buffer with table lookups as rows_int4_bf16 does, the table of a row holding
// bf16((v - 8) * scale) for its group (the values a prompt's dequantised bf16 GEMM multiplies), the 4 vectors
// P_0..P_3 of a row being rows of 4 A tiles (16 rows x 32 bf16; word j of P_i = input 4j + i). x is the B operand,
// laid out once per call to match: tile (x block, chunk, i) row p holds, for each of the block's 16 rows of x, the
// pair of inputs under A words 2p, 2p + 1. C tiles are [16 W rows x 16 x rows] fp32 over all of K, written out
// transposed (with bias and residual) at the end. The next chunk is decoded (into the other of two buffers) while the
// tile products of this one run. x goes in blocks of 32 rows (two B tiles, four C tiles), the weight read once per
// block: for prompts it is read ceil(M / 32) times (from the L3 when it fits there).
struct Int4AmxArgs {
    const uint16_t* xv;                    // x in B-tile order: [x block][chunk][i][16 pairs p][16 rows][2]
    int64_t chunks;                        // K / 128
    const uint8_t* w; int64_t ldw;         // packed [N, K / 2], row stride ldw bytes
    const float* scale; int64_t lds, G;    // scales [N, K / G] (row stride lds), G a multiple of 128
    const uint16_t* bias;                  // [N] or null
    const uint16_t* res; int64_t ldr;      // residual [M, N] (row stride ldr) or null
    uint16_t* y; int64_t ldy;              // output [M, N] bf16
    int64_t M, N;
};

// Chunk c of W rows [n0, n0 + 32) (rows >= N: zero) into dst [4 (i)][32 rows][32 words], scaled and rounded.
DSI_AMX_TARGET void int4_amx_decode(const Int4AmxArgs& a, int64_t n0, int64_t c, uint16_t* dst) {
    const __m512 values = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f,
                                         6.f, 7.f);
    const int64_t g = c * 128 / a.G;
    for (int r = 0; r < 32; ++r) {
        uint16_t* d = dst + r * 32;
        if (n0 + r >= a.N) {
            for (int i = 0; i < 4; ++i) _mm512_store_si512(d + i * 1024, _mm512_setzero_si512());
            continue;
        }
        const uint8_t* row = a.w + (n0 + r) * a.ldw + 64 * c;
        const __m512i v = _mm512_loadu_si512(row);
        _mm_prefetch(reinterpret_cast<const char*>(row + 128), _MM_HINT_T0);     // two chunks ahead (never faults)
        const __m512 row_values = _mm512_mul_ps(values, _mm512_set1_ps(a.scale[(n0 + r) * a.lds + g]));
        const __m512i table = _mm512_broadcast_i64x4((__m256i)_mm512_cvtneps_pbh(row_values));   // RNE, as torch
        _mm512_store_si512(d, _mm512_permutexvar_epi16(v, table));
        _mm512_store_si512(d + 1024, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table));
        _mm512_store_si512(d + 2048, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), table));
        _mm512_store_si512(d + 3072, _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), table));
    }
}

// r[16] (rows) transposed in place: r[j][i] = old r[i][j] (unpacks within 128-bit lanes, then lane shuffles).
DSI_AMX_TARGET inline void transpose16x16(__m512 (&r)[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {       // r[4i + j], lane L: column 4L + j of rows 4i .. 4i + 3
        r[4 * i] = (__m512)_mm512_unpacklo_pd((__m512d)t[4 * i], (__m512d)t[4 * i + 2]);
        r[4 * i + 1] = (__m512)_mm512_unpackhi_pd((__m512d)t[4 * i], (__m512d)t[4 * i + 2]);
        r[4 * i + 2] = (__m512)_mm512_unpacklo_pd((__m512d)t[4 * i + 1], (__m512d)t[4 * i + 3]);
        r[4 * i + 3] = (__m512)_mm512_unpackhi_pd((__m512d)t[4 * i + 1], (__m512d)t[4 * i + 3]);
    }
    for (int j = 0; j < 4; ++j) {
        t[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
        t[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
        t[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
        t[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    }
    for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88);
        r[8 + j] = _mm512_shuffle_f32x4(t[j], t[8 + j], 0xdd);
        r[4 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0x88);
        r[12 + j] = _mm512_shuffle_f32x4(t[4 + j], t[12 + j], 0xdd);
    }
}

// The B tiles of one block of 16 rows of x from its rows laid out as layout_x_int4_bf16 writes them (xl: 16 rows of
// K words): tile (chunk, i) row p = dword p of vector (chunk, i) of each of the 16 rows. out: chunks x 4 tiles.
DSI_AMX_TARGET void int4_amx_tiles_x(const uint16_t* xl, int64_t K, int64_t chunks, uint16_t* out) {
    for (int64_t v = 0; v < chunks * 4; ++v) {
        __m512 r[16];
        for (int mm = 0; mm < 16; ++mm) r[mm] = _mm512_load_ps(reinterpret_cast<const float*>(xl + mm * K + 32 * v));
        transpose16x16(r);
        for (int p = 0; p < 16; ++p) _mm512_store_ps(reinterpret_cast<float*>(out + v * 512 + 32 * p), r[p]);
    }
}

// y rows [m0, m0 + 16) (those < M) x outputs [n0, n0 + 16) (those < N) from a stored C tile c [n][m] (fp32, 16 x 16),
// transposed in registers, + bias + residual, rounded once.
DSI_AMX_TARGET void int4_amx_epilogue(const Int4AmxArgs& a, const float* c, int64_t m0, int64_t n0) {
    if (n0 >= a.N) return;
    const __mmask16 mask = lanes16(a.N - n0);
    __m512 r[16];
    for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + 16 * i);
    transpose16x16(r);
    const __m512 b = a.bias ? widen16_mask(a.bias + n0, mask) : _mm512_setzero_ps();
    for (int64_t mm = 0; mm < 16 && m0 + mm < a.M; ++mm) {
        __m512 v = _mm512_add_ps(r[mm], b);                                      // x row m0 + mm
        if (a.res) v = _mm512_add_ps(v, widen16_mask(a.res + (m0 + mm) * a.ldr + n0, mask));
        _mm256_mask_storeu_epi16(a.y + (m0 + mm) * a.ldy + n0, mask, (__m256i)_mm512_cvtneps_pbh(v));
    }
}

// C tiles of one step stored to memory, waiting for their epilogue (as AmxPending).
struct Int4AmxPending {
    alignas(64) float c[4][256];
    int64_t m0 = 0, n0 = 0;
    int count = 0;                   // 0 (nothing pending), 2 or 4 tiles
};

DSI_AMX_TARGET inline void int4_amx_flush(const Int4AmxArgs& a, Int4AmxPending& p) {
    for (int t = 0; t < p.count; ++t) int4_amx_epilogue(a, p.c[t], p.m0 + 16 * (t >> 1), p.n0 + 16 * (t & 1));
    p.count = 0;
}

// W rows [32 q, 32 q + 32) against x blocks [xb0, xb1) (rows [16 xb0, 16 xb1) of x), two at a time (four C tiles);
// tile config loaded by the caller (all tiles 16 x 64 bytes). INLINE (one pair of x blocks): each chunk is decoded
// into one of two 4096-word buffers at abuf while the previous chunk's tile products run; else the whole K of the
// 32 rows is decoded into abuf (chunks x 4096 words) first, for every pair of x blocks to read. The epilogue of each
// step runs after the next step's tile instructions are issued (pend: two buffers, carried from call to call).
template <bool INLINE>
DSI_AMX_TARGET void int4_amx_pair(const Int4AmxArgs& a, int64_t q, int64_t xb0, int64_t xb1, uint16_t* abuf,
                                  Int4AmxPending (&pend)[2], int& cur) {
    const int64_t n0 = 32 * q;
    if (!INLINE)
        for (int64_t c = 0; c < a.chunks; ++c) int4_amx_decode(a, n0, c, abuf + c * 4096);
    for (int64_t xb = xb0; xb < xb1; xb += 2) {
        const bool two = xb + 1 < xb1;
        const uint16_t* x0 = a.xv + xb * a.chunks * 2048;       // 4 tiles of 512 words per chunk
        const uint16_t* x1 = x0 + a.chunks * 2048;
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
        if (INLINE) int4_amx_decode(a, n0, 0, abuf);
        for (int64_t c = 0; c < a.chunks; ++c) {
            const uint16_t* w = abuf + (INLINE ? (c & 1) : c) * 4096;
            for (int i = 0; i < 4; ++i) {
                _tile_loadd(4, w + i * 1024, 64);              // W rows 0 .. 15 of the pair
                _tile_loadd(5, w + i * 1024 + 512, 64);        // W rows 16 .. 31
                _tile_loadd(6, x0 + (c * 4 + i) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 5, 6);
                if (two) {
                    _tile_loadd(7, x1 + (c * 4 + i) * 512, 64);
                    _tile_dpbf16ps(2, 4, 7);
                    _tile_dpbf16ps(3, 5, 7);
                }
            }
            if (INLINE && c + 1 < a.chunks) int4_amx_decode(a, n0, c + 1, abuf + ((c + 1) & 1) * 4096);
        }
        int4_amx_flush(a, pend[cur ^ 1]);                  // the previous step, while these tiles compute
        Int4AmxPending& p = pend[cur];
        _tile_stored(0, p.c[0], 64);
        _tile_stored(1, p.c[1], 64);
        if (two) {
            _tile_stored(2, p.c[2], 64);
            _tile_stored(3, p.c[3], 64);
        }
        p.m0 = 16 * xb, p.n0 = n0, p.count = two ? 4 : 2;
        cur ^= 1;
    }
}

// W rows [32 q0, 32 q1) for every block of x. Up to 32 rows of x: one pass, chunks decoded as they are used. More:
// x in chunks of blocks whose B tiles fit in about 1 MiB of L2, the 32 rows' whole K decoded once per chunk of x.
DSI_AMX_TARGET void int4_amx_range(const Int4AmxArgs& a, int64_t xblocks, int64_t q0, int64_t q1) {
    Int4AmxPending pend[2];
    int cur = 0;
    amx_config(16);
    if (xblocks <= 2) {
        alignas(64) uint16_t abuf[8192];
        for (int64_t q = q0; q < q1; ++q) int4_amx_pair<true>(a, q, 0, xblocks, abuf, pend, cur);
    } else {
        static thread_local std::vector<uint16_t> wide;
        wide.resize(static_cast<size_t>(a.chunks * 4096 + 32));
        uint16_t* abuf = wide.data() + (32 - (reinterpret_cast<uintptr_t>(wide.data()) / 2) % 32) % 32;
        const int64_t step = std::max<int64_t>(2, (int64_t{1} << 20) / (a.chunks * 4096) / 2 * 2);   // x blocks
        for (int64_t xc = 0; xc < xblocks; xc += step)
            for (int64_t q = q0; q < q1; ++q)
                int4_amx_pair<false>(a, q, xc, std::min(xc + step, xblocks), abuf, pend, cur);
    }
    int4_amx_flush(a, pend[cur ^ 1]);
    _tile_release();
}

// ---------------------------------------------------------------- SwiGLU and decode attention (decode rows)
// exp of 16 fp32 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-6 polynomial, scalef for
// 2^n, which gives inf above ~88.7 and 0 / denormals below ~-87.3 as libm does); relative error ~1e-7, so a bf16
// rounding of a result differs from libm's in rare ties only. x is clamped to [-104, 89] only to keep r small.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(89.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
inline void store_bf16x16(uint16_t* p, __m512 v, __mmask16 m) {  // round to nearest even (no NaN inputs here)
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
void silu_mul_avx512(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        const __m512 gv = widen16_mask(g + i, m);
        const __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
        uint16_t sb[16];
        store_bf16x16(sb, s, 0xffff);                                  // silu rounded to bf16, as F.silu stores it
        store_bf16x16(y + i, _mm512_mul_ps(widen16(sb), widen16_mask(u + i, m)), m);
    }
}

// ---------------------------------------------------------------- LayerNorm and plain activations (decode rows)
// 1 / x of 16 fp32 lanes (x > 0 finite here): rcp14 and one Newton step, within ~1 ulp of the division and a
// fraction of its cost.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 recip16(__m512 x) {
    const __m512 r = _mm512_rcp14_ps(x);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(1.f)), r);
}

// r (>= 0) with the sign of x (integer ops: the _ps logic ops need AVX512DQ).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 copysign16(__m512 r, __m512 x) {
    const __m512i sign = _mm512_set1_epi32(static_cast<int>(0x80000000u));
    // bitwise (sign ? x : r): truth table 0xd8 for operands (r, x, sign)
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(r), _mm512_castps_si512(x), sign, 0xd8));
}

// Horner's rule over N coefficients, highest power first (fp32 FMAs).
template <int N>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 poly16(__m512 x, const float (&c)[N]) {
    __m512 p = _mm512_set1_ps(c[0]);
    for (int i = 1; i < N; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(c[i]));
    return p;
}

// erf of 16 fp32 lanes, within ~1 ulp of the correctly rounded value (measured against mpmath on 300k points of
// [-5, 5]: at most 1.02 ulp, 97% correctly rounded; torch's own fp32 erf: 96.5%). The polynomials are weighted
// least-squares fits toward minimax relative error, made for this file (coefficients rounded to fp32 one at a
// time, the rest refitted), on z = |x|:
//   z < 1:      erf = z + z P(z^2)                  (P: erf(z) / z - 1, relative error < 2e-8)
//   1 <= z < 4: erf = 1 - exp(-z^2) Q(1 / z)         (Q: erfc(z) exp(z^2), relative error < 4e-9; z^2 split
//               into its fp32 value and the FMA's rounding error, so exp(-z^2) keeps full precision)
//   z >= 4:     erf = 1 (erfc(4) = 1.5e-8 is below half an fp32 ulp of 1)
// then the sign of x. Only the branches some lane needs are computed.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 erf16(__m512 x) {
    static const float kSmall[] = {7.981585077e-05f, -8.043397684e-04f, 5.191358272e-03f, -2.685493417e-02f,
                                   1.128359884e-01f, -3.761262596e-01f, 1.283791661e-01f};
    static const float kLarge[] = {-3.674469888e-02f, 2.555876672e-01f, -7.859658599e-01f, 1.385236979e+00f,
                                   -1.484951735e+00f, 8.731011152e-01f, -5.721943080e-02f, -2.888599932e-01f,
                                   3.730644705e-03f, 5.636389852e-01f, 2.990115900e-05f};
    const __m512 z = _mm512_abs_ps(x);
    const __mmask16 small = _mm512_cmp_ps_mask(z, _mm512_set1_ps(1.f), _CMP_LT_OQ);
    __m512 r = _mm512_set1_ps(1.f);
    if (small) {
        const __m512 p = poly16(_mm512_mul_ps(z, z), kSmall);
        r = _mm512_mask_mov_ps(r, small, _mm512_fmadd_ps(z, p, z));
    }
    const __mmask16 large = _mm512_cmp_ps_mask(z, _mm512_set1_ps(4.f), _CMP_LT_OQ) & ~small;
    if (large) {
        const __m512 z2 = _mm512_mul_ps(z, z);
        const __m512 z2_err = _mm512_fmsub_ps(z, z, z2);                   // z^2 = z2 + z2_err exactly
        __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), z2));
        e = _mm512_fnmadd_ps(z2_err, e, e);                                  // exp(-z2 - z2_err) to first order
        const __m512 erfc = _mm512_mul_ps(e, poly16(recip16(z), kLarge));
        r = _mm512_mask_mov_ps(r, large, _mm512_sub_ps(_mm512_set1_ps(1.f), erfc));
    }
    return copysign16(r, x);
}

// tanh of 16 fp32 lanes, within ~1 ulp of the correctly rounded value (measured as erf16: at most 0.94 ulp, 96%
// correctly rounded), on a = |x|:
//   a < 1:   tanh = a + a^3 P(a^2)            (P: (tanh(a) - a) / a^3, relative error < 3e-8; fitted as erf16's)
//   a >= 1:  tanh = 1 - 2 / (exp(2a) + 1)
//   a > 8.664339742: 1, where SLEEF's tanhf (torch's vectorised tanh) saturates; so GeLU (tanh) follows torch's
//   bf16 result in the far negative tail, where 1 + tanh cancels
// then the sign of x.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 tanh16(__m512 x) {
    static const float kSmall[] = {2.067586320e-04f, -1.152922632e-03f, 3.531666938e-03f, -8.927474730e-03f,
                                   2.191364951e-02f, -5.397828668e-02f, 1.333341151e-01f, -3.333333433e-01f};
    const __m512 a = _mm512_abs_ps(x);
    const __mmask16 small = _mm512_cmp_ps_mask(a, _mm512_set1_ps(1.f), _CMP_LT_OQ);
    __m512 r = _mm512_set1_ps(1.f);
    if (small) {
        const __m512 s = _mm512_mul_ps(a, a);
        r = _mm512_mask_mov_ps(r, small, _mm512_fmadd_ps(_mm512_mul_ps(a, s), poly16(s, kSmall), a));
    }
    const __mmask16 large = _mm512_cmp_ps_mask(a, _mm512_set1_ps(8.664339742f), _CMP_LE_OQ) & ~small;
    if (large) {
        const __m512 e = exp16(_mm512_add_ps(a, a));
        const __m512 t = _mm512_fnmadd_ps(_mm512_set1_ps(2.f), recip16(_mm512_add_ps(e, _mm512_set1_ps(1.f))),
                                          _mm512_set1_ps(1.f));
        r = _mm512_mask_mov_ps(r, large, t);
    }
    return copysign16(r, x);
}

// Plain activations of dsi_act_bf16 (the engine's names: reference.act).
enum ActKind { kGelu = 0, kGeluTanh = 1, kRelu = 2, kSilu = 3, kRelu2 = 4 };   // (kRelu2: plain activations only)

// act of 16 fp32 lanes, in torch's order of operations for bf16 rows (aten/src/ATen/native/cpu/Gelu.h): gelu
// x * 0.5 * (1 + erf(x / sqrt 2)); gelu_tanh 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))); silu x / (1 + exp(-x));
// relu max(x, 0) (NaN and -0 kept, as torch's); relu2 max(x, 0)^2 (F.relu(x).square(): the square rounded once).
template <int KIND>
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 act16(__m512 v) {
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.f);
    if (KIND == kGelu)
        return _mm512_mul_ps(_mm512_mul_ps(v, half),
                             _mm512_add_ps(one, erf16(_mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f)))));
    if (KIND == kGeluTanh) {
        const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
        const __m512 inner = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                           _mm512_add_ps(v, _mm512_mul_ps(_mm512_set1_ps(0.044715f), cube)));
        return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, tanh16(inner)));
    }
    if (KIND == kRelu) return _mm512_max_ps(_mm512_setzero_ps(), v);   // (vmaxps: its 2nd operand for NaN / both 0)
    if (KIND == kRelu2) {
        const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), v);
        return _mm512_mul_ps(r, r);
    }
    return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
}

// y = act(x) over n bf16 elements, fp32 inside and one rounding (act16).
template <int KIND>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void act_row_avx512(const uint16_t* x, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        store_bf16x16(y + i, act16<KIND>(widen16_mask(x + i, m)), m);
    }
}

// A gated MLP's activation over n outputs: y = round(round(act(g)) * u) (GeGLU: F.gelu, then mul_, as the torch
// reference rounds, fp32 inside each op and bf16 between; kSilu gives silu_mul_avx512's SwiGLU).
template <int KIND>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void gated_row_avx512(const uint16_t* g, const uint16_t* u, uint16_t* y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        uint16_t ab[16];
        store_bf16x16(ab, act16<KIND>(widen16_mask(g + i, m)), 0xffff);      // act(g) rounded to bf16
        store_bf16x16(y + i, _mm512_mul_ps(widen16(ab), widen16_mask(u + i, m)), m);
    }
}

// LayerNorm of one row of n bf16 with weight w and bias b: mean, then the variance as the mean of (x - mean)^2
// (two passes over the row, 16 fp32 lanes each), rstd = 1 / sqrt(var + eps), and
// y = (x * rstd - mean * rstd) * w + b, the order torch's CPU kernel uses; one rounding.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void layer_norm_row_avx512(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y, int64_t n,
                           float eps) {
    __m512 s = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) s = _mm512_add_ps(s, widen16_mask(x + i, lanes16(n - i)));
    const float mean = _mm512_reduce_add_ps(s) / static_cast<float>(n);
    const __m512 mv = _mm512_set1_ps(mean);
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        const __m512 d = _mm512_maskz_sub_ps(m, widen16_mask(x + i, m), mv);
        ss = _mm512_fmadd_ps(d, d, ss);
    }
    const float var = _mm512_reduce_add_ps(ss) / static_cast<float>(n);
    // a sum of squares that overflowed fp32 gives NaN, as torch's does (not rstd = 0, which would return the bias)
    const float rstd = isinf(var) ? NAN : 1.f / sqrtf(var + eps);
    const __m512 scale = _mm512_set1_ps(rstd), shift = _mm512_set1_ps(-mean * rstd);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = lanes16(n - i);
        const __m512 v = _mm512_fmadd_ps(widen16_mask(x + i, m), scale, shift);
        store_bf16x16(y + i, _mm512_fmadd_ps(v, widen16_mask(w + i, m), widen16_mask(b + i, m)), m);
    }
}

struct AttnArgs {
    const uint16_t* q; int64_t qb, qh;          // [B, Hq, D], unit stride along D
    const uint16_t* k; const uint16_t* v;       // [B, Hkv, L, D] with strides (kb, kh, kl, 1), same for v
    int64_t kb, kh, kl;
    const uint8_t* mask; int64_t mb, ml;        // bool [B, L] (True = attend) or null
    uint16_t* out;                              // [B, Hq, D] contiguous
    int64_t B, hq, hkv, L, D;
    float scale;
    float softcap;                              // > 0: scores -> softcap * tanh(score / softcap) (Gemma 2); 0: none
    const float* sinks = nullptr;               // [Hq] logits in each softmax's denominator, no value (gpt-oss); null
    const float* alibi = nullptr;               // [Hq] slopes (BLOOM): score_j += slope * (j - (L - 1)); null: none
};

// Gemma 2's soft-capped scores of 16 lanes: tanh(s / cap) * cap (reference.attention's order).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 softcap16(__m512 s, float cap) {
    const __m512 c = _mm512_set1_ps(cap);
    return _mm512_mul_ps(tanh16(_mm512_div_ps(s, c)), c);
}

// BLOOM's ALiBi bias of 16 lanes: s + slope * rel (rel: key column - query column, exact integers), the product
// rounded before the sum as reference.attention's (the mul with an explicit rounding mode, so -ffp-contract cannot
// fuse it into an FMA).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 alibi16(__m512 s, float slope, __m512 rel) {
    const __m512 bias = _mm512_mul_round_ps(_mm512_set1_ps(slope), rel, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_add_ps(s, bias);
}

// Lane i of the result = the sum of the 16 lanes of v[i] (16 horizontal sums in 45 shuffles / adds instead of
// 16 separate reductions): pairs within 128-bit chunks, then quads, then across chunks.
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __m512 hsum16x16(const __m512* v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; ++i)   // chunk k of t[i]: [a0+a2, b0+b2, a1+a3, b1+b3] for a = v[2i], b = v[2i+1]
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; ++i)   // chunk k of u[i]: chunk k's sums of v[4i .. 4i + 3]
        u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xee));
    const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, 0x88), _mm512_shuffle_f32x4(x01, x23, 0xdd));
}

// Visible-key bits of columns [j, j + 16) of a mask row (bytes, column stride ml).
__attribute__((target("avx512f,avx512bw,avx512vl")))
inline __mmask16 mask_bits16(const uint8_t* mrow, int64_t ml, int64_t j) {
    if (ml == 1) {
        const __m128i m = _mm_loadu_si128(reinterpret_cast<const __m128i*>(mrow + j));
        return _mm_test_epi8_mask(m, m);
    }
    __mmask16 bits = 0;
    for (int i = 0; i < 16; ++i) bits |= static_cast<__mmask16>(mrow[(j + i) * ml] != 0) << i;
    return bits;
}

// One (batch row, KV head) with up to NV vectors of 16 per head row (vector c loads min(16, D - 16c) lanes, none
// past D: a head of 96 runs in the NV = 8 instance with two empty vectors): its G = Hq / Hkv query heads read each
// K and V row from L1 (the unit's K / V rows are read from memory once). fp32 throughout: scores (16 keys at a
// time, one transposed horizontal sum; soft-capped when a.softcap > 0, then ALiBi's slope * (j - (L - 1)) added when
// a.alibi is set: a product rounded, then a sum, as the reference), softmax (max-subtracted, masked keys exactly
// 0; a head's sink, when a.sinks is set, joins the max and the sum with no value), the weighted sum of V in
// registers, one division and one rounding to bf16 at the end.
template <int NV>
__attribute__((target("avx512f,avx512bw,avx512vl")))
void attn_unit_avx512(const AttnArgs& a, int64_t b, int64_t kh, std::vector<float>& scratch) {
    const int64_t G = a.hq / a.hkv, D = a.D, L = a.L;
    const __mmask16 full = 0xffff;
    const bool capped = a.softcap > 0.f;
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const float q_col = static_cast<float>(L - 1);   // the decode query's own column (ALiBi's origin)
    __mmask16 lanes[NV];                             // lanes of vector c that lie inside the head
    for (int c = 0; c < NV; ++c) lanes[c] = lanes16(D - 16 * c);
    scratch.resize(static_cast<size_t>(G * L + G * NV * 16));
    float* s = scratch.data();                       // [G, L] scores, then unnormalised probabilities
    float* qf = s + G * L;                           // [G, NV * 16] q * scale, zero past D
    for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qr = a.q + b * a.qb + (kh * G + g) * a.qh;
        for (int c = 0; c < NV; ++c)
            _mm512_storeu_ps(qf + (g * NV + c) * 16,
                             _mm512_mul_ps(widen16_mask(qr + c * 16, lanes[c]), _mm512_set1_ps(a.scale)));
    }
    const uint16_t* kbase = a.k + b * a.kb + kh * a.kh;
    const uint16_t* vbase = a.v + b * a.kb + kh * a.kh;
    const uint8_t* mrow = a.mask ? a.mask + b * a.mb : nullptr;
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    int64_t j0 = 0;
    for (; j0 + 16 <= L; j0 += 16) {
        const __mmask16 keep = mrow ? mask_bits16(mrow, a.ml, j0) : full;
        for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf + g * NV * 16;
            __m512 dots[16];
            for (int i = 0; i < 16; ++i) {
                const uint16_t* kr = kbase + (j0 + i) * a.kl;
                __m512 d = _mm512_mul_ps(_mm512_loadu_ps(qg), widen16_mask(kr, lanes[0]));
                for (int c = 1; c < NV; ++c)
                    d = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), widen16_mask(kr + c * 16, lanes[c]), d);
                dots[i] = d;
            }
            __m512 sc = hsum16x16(dots);
            if (capped) sc = softcap16(sc, a.softcap);
            if (a.alibi)   // rel = j - (L - 1): exact in fp32 (integers below 2^24)
                sc = alibi16(sc, a.alibi[kh * G + g], _mm512_sub_ps(_mm512_add_ps(iota, _mm512_set1_ps(j0)),
                                                                    _mm512_set1_ps(q_col)));
            _mm512_storeu_ps(s + g * L + j0, _mm512_mask_blend_ps(keep, neg_inf, sc));
        }
    }
    for (int64_t j = j0; j < L; ++j) {               // the last L % 16 keys one at a time
        const bool visible = !mrow || mrow[j * a.ml];
        const uint16_t* kr = kbase + j * a.kl;
        for (int64_t g = 0; g < G; ++g) {
            const float* qg = qf + g * NV * 16;
            __m512 d = _mm512_setzero_ps();
            for (int c = 0; c < NV; ++c)
                d = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), widen16_mask(kr + c * 16, lanes[c]), d);
            float sc = _mm512_reduce_add_ps(d);
            if (capped) sc = _mm512_cvtss_f32(softcap16(_mm512_set1_ps(sc), a.softcap));   // the same lane arithmetic
            if (a.alibi)
                sc = _mm512_cvtss_f32(alibi16(_mm512_set1_ps(sc), a.alibi[kh * G + g],
                                              _mm512_set1_ps(static_cast<float>(j) - q_col)));
            s[g * L + j] = visible ? sc : -INFINITY;
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        float* sr = s + g * L;
        __m512 mx = neg_inf;
        for (int64_t j = 0; j < L; j += 16) {
            const __mmask16 m = lanes16(L - j);
            mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(neg_inf, m, sr + j));
        }
        float mxs = _mm512_reduce_max_ps(mx);
        uint16_t* o = a.out + (b * a.hq + kh * G + g) * D;
        if (mxs == -INFINITY) {                       // no visible key: zeros (the engine never asks for this)
            for (int c = 0; c < NV; ++c) store_bf16x16(o + c * 16, _mm512_setzero_ps(), lanes[c]);
            continue;
        }
        const float sink = a.sinks ? a.sinks[kh * G + g] : -INFINITY;
        if (sink > mxs) mxs = sink;                   // the sink's column joins the max: no overflow of its term
        __m512 tot = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; j += 16) {
            const __mmask16 m = lanes16(L - j);
            const __m512 x = _mm512_mask_loadu_ps(neg_inf, m, sr + j);
            const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, neg_inf, _CMP_NEQ_OQ),
                                                 exp16(_mm512_sub_ps(x, _mm512_set1_ps(mxs))));
            _mm512_mask_storeu_ps(sr + j, m, e);
            tot = _mm512_add_ps(tot, e);
        }
        __m512 acc[NV];
        for (int c = 0; c < NV; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; ++j) {
            if (sr[j] == 0.f) continue;               // masked (or underflowed) keys: skip the V row
            const __m512 p = _mm512_set1_ps(sr[j]);
            const uint16_t* vr = vbase + j * a.kl;
            for (int c = 0; c < NV; ++c)
                acc[c] = _mm512_fmadd_ps(p, widen16_mask(vr + c * 16, lanes[c]), acc[c]);
        }
        const float sink_term = a.sinks ? expf(sink - mxs) : 0.f;     // the sink's share of the denominator
        const __m512 inv = _mm512_set1_ps(1.f / (_mm512_reduce_add_ps(tot) + sink_term));
        for (int c = 0; c < NV; ++c) store_bf16x16(o + c * 16, _mm512_mul_ps(acc[c], inv), lanes[c]);
    }
}

using AttnUnit = void (*)(const AttnArgs&, int64_t, int64_t, std::vector<float>&);

// The instance for a head of D: NV = 2, 4, 8, 16 or 32 (D <= 512), or null.
AttnUnit attn_unit_for(int64_t D) {
    if (D <= 32) return attn_unit_avx512<2>;
    if (D <= 64) return attn_unit_avx512<4>;
    if (D <= 128) return attn_unit_avx512<8>;
    if (D <= 256) return attn_unit_avx512<16>;
    if (D <= 512) return attn_unit_avx512<32>;   // (Gemma 4's full layers)
    return nullptr;
}

// Decode attention for every (row, KV head) unit, on `threads` OpenMP threads (1: this thread). AVX512 only
// (callers check dsi_gemv_best_isa() >= 2; without it torch's SDPA is faster than a scalar loop), D <= 512.
void run_attention(const AttnArgs& a, int threads) {
    const AttnUnit unit = attn_unit_for(a.D);
    const int64_t units = a.B * a.hkv;
    if (a.B * a.hq * a.L * a.D < kSerialAttentionWork) threads = 1;
    if (threads <= 1 || units < 2) {
        static thread_local std::vector<float> scratch;
        for (int64_t u = 0; u < units; ++u) unit(a, u / a.hkv, u % a.hkv, scratch);
        return;
    }
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scratch;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units; ++u) unit(a, u / a.hkv, u % a.hkv, scratch);
    }
}

}  // namespace

extern "C" {

// Largest path this CPU runs: 4 AMX-BF16, 3 AVX512-BF16, 2 AVX512F/BW/VL, 1 AVX2+FMA, 0 none. AMX also needs
// the kernel's permission for the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16+), asked for here.
int dsi_gemv_best_isa(void) {
    static const int best = [] {
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl")) {
            if (!__builtin_cpu_supports("avx512bf16")) return 2;
            const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
            if (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-bf16") &&
                syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0)
                return 4;
            return 3;
        }
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
        return 0;
    }();
    return best;
}

// y = x @ w^T (+ bias) (+ res), all bf16 (uint16 bit patterns), any M (W is read from memory once; each
// further block of 4 rows of x re-reads the current 4 rows of W from L1/L2, so time grows with M past 4).
// Rows of W are split over `threads` OpenMP threads in contiguous ranges.
// Returns 0, or -1 for an unsupported isa / shape.
int dsi_gemv_bf16(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* bias, const void* res,
                  int64_t ldr, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads, int isa) {
    if (isa == 4) isa = 3;  // row-major weights: the AMX path needs the packed layout
    if (isa < 1 || isa > 3 || isa > dsi_gemv_best_isa() || M < 1 || N < 1 || K < 1) return -1;
    if (N * K < kSerialLinearWork) threads = 1;
    const Args a{static_cast<const uint16_t*>(x), ldx, static_cast<const uint16_t*>(w), ldw,
                 static_cast<const uint16_t*>(bias), static_cast<const uint16_t*>(res), ldr, static_cast<uint16_t*>(y),
                 ldy, N, K};
    split_rows(threads, N, [&](int64_t n_begin, int64_t n_end) { run_range(isa, M, a, n_begin, n_end); });
    return 0;
}

// out[n, k] = bf16(q[n, k] * scale[n]) (round to nearest even): an int8 weight dequantised for a prompt's GEMM
// (many rows: AMX / oneDNN on bf16 beats the fp32 FMAs of dsi_gemv_int8). Rows split over `threads`.
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void dequant_rows(const int8_t* q, int64_t ldq, const float* scale, int64_t K, uint16_t* out, int64_t n0,
                         int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
        const __m512 s = _mm512_set1_ps(scale[n]);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mask = lanes16(K - k);
            store_bf16x16(out + n * K + k, _mm512_mul_ps(widen_i8(q + n * ldq + k, mask), s), mask);
        }
    }
}

int dsi_dequant_int8_bf16(const void* q, int64_t ldq, const void* scale, int64_t N, int64_t K, void* out, int threads) {
    if (dsi_gemv_best_isa() < 2 || N < 1 || K < 1) return -1;
    if (N * K < kSerialLinearWork) threads = 1;
    split_rows(threads, N, [&](int64_t n0, int64_t n1) {
        dequant_rows(static_cast<const int8_t*>(q), ldq, static_cast<const float*>(scale), K,
                     static_cast<uint16_t*>(out), n0, n1);
    });
    return 0;
}

// y = (x @ q^T) * scale (+ bias) (+ res): x, bias, res, y bf16; q int8 [N, K] with row stride ldw; scale fp32 [N].
// Any M, as dsi_gemv_bf16. Returns 0, or -1 without AVX512 or for an empty shape.
int dsi_gemv_int8(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* scale, const void* bias,
                  const void* res, int64_t ldr, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (dsi_gemv_best_isa() < 2 || M < 1 || N < 1 || K < 1) return -1;
    if (N * K < kSerialLinearWork) threads = 1;
    const Args a{static_cast<const uint16_t*>(x), ldx, static_cast<const uint16_t*>(w), ldw,
                 static_cast<const uint16_t*>(bias), static_cast<const uint16_t*>(res), ldr, static_cast<uint16_t*>(y),
                 ldy, N, K, static_cast<const float*>(scale)};
    split_rows(threads, N, [&](int64_t n_begin, int64_t n_end) { run_range(kInt8Rows, M, a, n_begin, n_end); });
    return 0;
}

// y = x @ dequant(w)^T (+ bias) (+ res): x, bias, res, y bf16; w int4 group-wise (see "int4 group-wise weights":
// packed uint8 [N, K / 2] with row stride ldw bytes, scales fp32 [N, K / G] with row stride lds). isa 3 (or 4):
// the AVX512-BF16 path for up to kInt4Bf16Rows rows, the fp32 path for more; 2: the AVX512F fp32 path. G: 8, 16, 32,
// 64 or a multiple of 128, dividing K. Any M (as dsi_gemv_bf16, time grows with M past 4). Returns 0, or -1 for an
// unsupported isa / shape / group.
int dsi_gemv_int4(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* scale, int64_t lds, int64_t G,
                  const void* bias, const void* res, int64_t ldr, void* y, int64_t ldy, int64_t M, int64_t N,
                  int64_t K, int threads, int isa) {
    if (isa == 4) isa = 3;
    if (isa < 2 || isa > 3 || isa > dsi_gemv_best_isa() || M < 1 || N < 1 || K < 1 || !int4_group_ok(G) || K % G)
        return -1;
    if (M > kInt4Bf16Rows) isa = 2;
    if (N * K < kSerialLinearWork) threads = 1;
    const int64_t Kp = (K + 127) / 128 * 128;
    static thread_local std::vector<uint16_t> xb;   // x laid out for the path (fp32 uses it as floats)
    xb.resize(static_cast<size_t>(M * Kp * (isa == 3 ? 1 : 2)) + 32);
    void* xl = xb.data() + (32 - (reinterpret_cast<uintptr_t>(xb.data()) / 2) % 32) % 32;   // 64-byte aligned
    if (isa == 3) layout_x_int4_bf16(static_cast<const uint16_t*>(x), ldx, M, K, static_cast<uint16_t*>(xl));
    else layout_x_int4_f32(static_cast<const uint16_t*>(x), ldx, M, K, static_cast<float*>(xl));
    const Int4Args a{xl, Kp, static_cast<const uint8_t*>(w), ldw, static_cast<const float*>(scale), lds, G,
                     static_cast<const uint16_t*>(bias), static_cast<const uint16_t*>(res), ldr,
                     static_cast<uint16_t*>(y), ldy, N, K};
    split_rows(threads, N, [&](int64_t n_begin, int64_t n_end) { run_range_int4(isa, M, a, n_begin, n_end); });
    return 0;
}

// out[n, k] = (q[n, k] - 8) * scale[n, k / G] as fp32 (out_fp32) or rounded to bf16 (nearest even), out [N, K]
// contiguous: an int4 weight dequantised for a prompt's GEMM (fp32: the exact fp32 products). Rows split over
// `threads`. Returns 0, or -1 without AVX512 or for an unsupported shape / group.
extern "C++" {
// The scales of inputs k .. k + 15 (k < K) of a row's scales s (G = 8: two groups).
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512 dequant_int4_scales(const float* s, int64_t k, int64_t G, int64_t K) {
    if (G >= 16) return _mm512_set1_ps(s[k / G]);
    const __m512i half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(half, _mm512_maskz_loadu_ps(K - k >= 16 ? 3 : 1, s + k / G));
}

template <bool F32>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline void dequant_int4_store(void* out, int64_t n, int64_t k, int64_t K, __m512 v) {
    const __mmask16 m = lanes16(K - k);
    if (F32) _mm512_mask_storeu_ps(static_cast<float*>(out) + n * K + k, m, v);
    else store_bf16x16(static_cast<uint16_t*>(out) + n * K + k, v, m);
}

template <bool F32>
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void dequant_int4_rows(const uint8_t* w, int64_t ldw, const float* scale, int64_t lds, int64_t G, int64_t K,
                              void* out, int64_t n0, int64_t n1) {
    const __m512 table = _mm512_setr_ps(-8.f, -7.f, -6.f, -5.f, -4.f, -3.f, -2.f, -1.f, 0.f, 1.f, 2.f, 3.f, 4.f, 5.f,
                                        6.f, 7.f);
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* row = w + n * ldw;
        const float* s = scale + n * lds;
        for (int64_t k = 0; k < K; k += 32) {
            const int64_t bytes = std::min<int64_t>(16, (K - k) / 2);
            const __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(static_cast<__mmask16>((1u << bytes) - 1),
                                                                         row + k / 2));
            const __m512 lo = _mm512_permutexvar_ps(b, table);                         // inputs k + 2i
            const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);   // inputs k + 2i + 1
            dequant_int4_store<F32>(out, n, k, K, _mm512_mul_ps(_mm512_permutex2var_ps(lo, lo_idx, hi),
                                                                 dequant_int4_scales(s, k, G, K)));
            if (k + 16 < K)
                dequant_int4_store<F32>(out, n, k + 16, K, _mm512_mul_ps(_mm512_permutex2var_ps(lo, hi_idx, hi),
                                                                         dequant_int4_scales(s, k + 16, G, K)));
        }
    }
}
}  // extern "C++"

int dsi_dequant_int4(const void* w, int64_t ldw, const void* scale, int64_t lds, int64_t G, int64_t N, int64_t K,
                     void* out, int out_fp32, int threads) {
    if (dsi_gemv_best_isa() < 2 || N < 1 || K < 1 || !int4_group_ok(G) || K % G) return -1;
    if (N * K < kSerialLinearWork) threads = 1;
    split_rows(threads, N, [&](int64_t n0, int64_t n1) {
        if (out_fp32) dequant_int4_rows<true>(static_cast<const uint8_t*>(w), ldw, static_cast<const float*>(scale),
                                              lds, G, K, out, n0, n1);
        else dequant_int4_rows<false>(static_cast<const uint8_t*>(w), ldw, static_cast<const float*>(scale), lds, G,
                                      K, out, n0, n1);
    });
    return 0;
}

// RMSNorm of `rows` bf16 rows of n: normalise in fp32 (x * 1 / sqrt(mean(x^2) + eps)), then with bf16 weights
// (w_f32 = 0) HF's order for bf16: round to bf16, scale by w, round; with fp32 weights (w_f32 = 1: Gemma's (1 + w),
// builder.norm_weight) Gemma's order: scale in fp32, round once. Decode-sized calls (a few rows): one thread, no
// fork/join; what this saves is the ~6 torch ops of the composite.
void dsi_rms_norm_bf16(const void* x, int64_t ldx, const void* w, int w_f32, void* y, int64_t ldy, int64_t rows,
                       int64_t n, float eps) {
    const uint16_t* xs = static_cast<const uint16_t*>(x);
    const uint16_t* ws = static_cast<const uint16_t*>(w);
    const float* wf = static_cast<const float*>(w);
    uint16_t* ys = static_cast<uint16_t*>(y);
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t* xr = xs + r * ldx;
        uint16_t* yr = ys + r * ldy;
        float ss = 0.f;
        for (int64_t i = 0; i < n; ++i) {
            const float v = bf16_to_f32(xr[i]);
            ss += v * v;
        }
        const float inv = 1.f / sqrtf(ss / static_cast<float>(n) + eps);
        if (w_f32)
            for (int64_t i = 0; i < n; ++i) yr[i] = f32_to_bf16(bf16_to_f32(xr[i]) * inv * wf[i]);
        else
            for (int64_t i = 0; i < n; ++i)
                yr[i] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[i]) * inv)) * bf16_to_f32(ws[i]));
    }
}

// Qwen3's (Gemma 3's: fp32 weights, w_f32) per-head RMSNorm of q and k, in place on `tokens` rows of a fused QKV
// output (each row: hq q heads, hkv k heads, hkv v heads of D; rows contiguous), before rotary: dsi_rms_norm_bf16 on
// every q and k head.
void dsi_head_norms_bf16(void* qkv, int64_t tokens, int64_t hq, int64_t hkv, int64_t D, const void* q_norm,
                         const void* k_norm, int w_f32, float eps) {
    uint16_t* base = static_cast<uint16_t*>(qkv);
    for (int64_t t = 0; t < tokens; ++t) {
        uint16_t* row = base + t * (hq + 2 * hkv) * D;
        dsi_rms_norm_bf16(row, D, q_norm, w_f32, row, D, hq, D, eps);
        dsi_rms_norm_bf16(row + hq * D, D, k_norm, w_f32, row + hq * D, D, hkv, D, eps);
    }
}

// Whether process `pid` of this host still runs (not gone, not a zombie); pid <= 0: not known, taken as running, as
// is a /proc entry that cannot be opened for another reason than its absence.
static int pid_alive(int64_t pid) {
    if (pid <= 0) return 1;
    char path[64];
    snprintf(path, sizeof path, "/proc/%lld/stat", static_cast<long long>(pid));
    FILE* f = fopen(path, "r");
    if (f == nullptr) return errno != ENOENT;
    char buf[512];
    const size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char* p = strrchr(buf, ')');
    if (p == nullptr || p[1] == 0 || p[2] == 0) return 1;
    return p[2] != 'Z' && p[2] != 'X';
}

// One call of parallel/shm.py's shared-memory all-reduce (or all-gather), the whole protocol in C: copy x into
// my fp32 slot, publish `step` in my flag (release), spin until every flag reaches `step` (acquire; yield every
// 64 spins), then, for sum != 0, x = round(sum of the slots in rank order). x is bf16 (is_bf16) or fp32. The
// ranks' pids follow the flags (flags[size + r]): every 50 ms of waiting the lagging rank's process is looked up,
// so a peer that died ends the wait at once rather than after timeout_s. Returns 0, or 1 when a peer exited or
// did not arrive within timeout_s. The same arithmetic as the torch path (fp32 sum in rank order, one rounding),
// at ~2 us instead of ~18 us of torch ops per call.
int dsi_shm_exchange(void* x, int is_bf16, int64_t n, float* slots, int64_t capacity, int64_t* flags, int size,
                     int rank, int64_t step, double timeout_s, int sum) {
    float* mine = slots + rank * capacity;
    if (is_bf16) {
        const uint16_t* xs = static_cast<const uint16_t*>(x);
        for (int64_t i = 0; i < n; ++i) mine[i] = bf16_to_f32(xs[i]);
    } else {
        memcpy(mine, x, n * sizeof(float));
    }
    __atomic_store_n(&flags[rank], step, __ATOMIC_RELEASE);
    timespec start{};
    clock_gettime(CLOCK_MONOTONIC, &start);
    double checked = 0.0;
    for (int r = 0; r < size; ++r) {
        int64_t spins = 0;
        while (__atomic_load_n(&flags[r], __ATOMIC_ACQUIRE) < step) {
            _mm_pause();
            if (++spins % 64 == 0) {
                sched_yield();
                timespec now{};
                clock_gettime(CLOCK_MONOTONIC, &now);
                const double waited = (now.tv_sec - start.tv_sec) + 1e-9 * (now.tv_nsec - start.tv_nsec);
                if (waited > timeout_s) return 1;
                if (waited - checked > 0.05) {
                    checked = waited;
                    if (!pid_alive(__atomic_load_n(&flags[size + r], __ATOMIC_RELAXED))) return 1;
                }
            }
        }
    }
    if (!sum) return 0;
    for (int64_t i = 0; i < n; ++i) {
        float acc = slots[i];
        for (int r = 1; r < size; ++r) acc += slots[r * capacity + i];
        if (is_bf16)
            static_cast<uint16_t*>(x)[i] = f32_to_bf16(acc);
        else
            static_cast<float*>(x)[i] = acc;
    }
    return 0;
}

// NeoX rotary of q and k and the K/V append, for a few bf16 tokens (decode): qkv [B, T, hq + 2 hkv, D]
// contiguous, cos / sin [B, T, R] (sin signed: cat(-s, s)), q_out [B, T, hq, D], k_out [B, T, hkv, D]; caches
// (or null) [B, hkv, S, D] with strides (cb, ch, D, 1), written at columns [col, col + T). The first R (even, <= D)
// dims of each head rotate ("rotate half" within them), the rest pass through (partial rotary: GPT-NeoX, Phi,
// StableLM); R = 0: no rotary at all (learned positions: q and k as projected, cos / sin unused). Same roundings as
// the torch reference: t = round(x * cos), out = round(t + swapped * sin).
void dsi_rotary_write_kv_bf16(const void* qkv, const void* cos, const void* sin, int64_t B, int64_t T, int64_t hq,
                              int64_t hkv, int64_t D, int64_t R, void* q_out, void* k_out, void* k_cache,
                              void* v_cache, int64_t cb, int64_t ch, int64_t col) {
    const uint16_t* in = static_cast<const uint16_t*>(qkv);
    const uint16_t* cs = static_cast<const uint16_t*>(cos);
    const uint16_t* sn = static_cast<const uint16_t*>(sin);
    uint16_t* qo = static_cast<uint16_t*>(q_out);
    uint16_t* ko = static_cast<uint16_t*>(k_out);
    uint16_t* kc = static_cast<uint16_t*>(k_cache);
    uint16_t* vc = static_cast<uint16_t*>(v_cache);
    const int64_t heads = hq + 2 * hkv, half = R / 2;
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t) {
            const uint16_t* row = in + ((b * T + t) * heads) * D;
            const uint16_t* c = cs + (b * T + t) * R;
            const uint16_t* s = sn + (b * T + t) * R;
            for (int64_t h = 0; h < hq + hkv; ++h) {
                const uint16_t* x = row + h * D;
                uint16_t* out = h < hq ? qo + ((b * T + t) * hq + h) * D : ko + ((b * T + t) * hkv + (h - hq)) * D;
                for (int64_t i = 0; i < R; ++i) {
                    const float swapped = bf16_to_f32(x[i < half ? i + half : i - half]);
                    const float xc = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * bf16_to_f32(c[i])));
                    const float prod = swapped * bf16_to_f32(s[i]);
                    out[i] = f32_to_bf16(xc + prod);
                }
                memcpy(out + R, x + R, (D - R) * sizeof(uint16_t));
                if (h >= hq && kc) memcpy(kc + b * cb + (h - hq) * ch + (col + t) * D, out, D * sizeof(uint16_t));
            }
            if (vc)
                for (int64_t h = 0; h < hkv; ++h)
                    memcpy(vc + b * cb + h * ch + (col + t) * D, row + (hq + hkv + h) * D, D * sizeof(uint16_t));
        }
}

// Packed size in elements for dsi_pack_amx: ceil32(N) * ceil32(K).
int64_t dsi_packed_numel(int64_t N, int64_t K) { return (N + 31) / 32 * 32 * ((K + 31) / 32 * 32); }

// Writes the AMX layout of w [N, K] (row stride ldw) to out (dsi_packed_numel(N, K) elements).
extern "C++" {
template <typename T>
static void pack_tiles(const T* src, int64_t ldw, int64_t N, int64_t K, T* dst, int threads) {
    const int64_t nb_n = (N + 31) / 32 * 2, kc_n = (K + 31) / 32;
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(static)
    for (int64_t nb = 0; nb < nb_n; ++nb) {
        for (int64_t kc = 0; kc < kc_n; ++kc) {
            T* t = dst + (nb * kc_n + kc) * 512;
            for (int j = 0; j < 16; ++j) {
                const int64_t n = nb * 16 + j;
                for (int kk = 0; kk < 32; ++kk) {
                    const int64_t k = kc * 32 + kk;
                    t[(kk / 2) * 32 + j * 2 + (kk % 2)] = (n < N && k < K) ? src[n * ldw + k] : T(0);
                }
            }
        }
    }
}

}  // extern "C++"

void dsi_pack_amx(const void* w, int64_t ldw, int64_t N, int64_t K, void* out, int threads) {
    pack_tiles(static_cast<const uint16_t*>(w), ldw, N, K, static_cast<uint16_t*>(out), threads);
}

// The same layout with int8 elements (dsi_packed_numel(N, K) bytes), for dsi_gemm_amx_int8.
void dsi_pack_amx_int8(const void* w, int64_t ldw, int64_t N, int64_t K, void* out, int threads) {
    pack_tiles(static_cast<const int8_t*>(w), ldw, N, K, static_cast<int8_t*>(out), threads);
}

extern "C++" {
template <bool I8>
static int gemm_amx(const void* x, int64_t ldx, const void* wp, const float* scale, const void* bias, const void* res,
                    int64_t ldr, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (dsi_gemv_best_isa() < 4 || M < 1 || N < 1 || K < 1) return -1;
    if (N * K < kSerialLinearWork) threads = 1;
    const int64_t Kp = (K + 31) / 32 * 32;
    const uint16_t* xs = static_cast<const uint16_t*>(x);
    int64_t lds = ldx;
    static thread_local std::vector<uint16_t> scratch;
    if (Kp != K) {  // tiles read 32 columns at a time: copy x into zero-padded rows
        scratch.assign(static_cast<size_t>(M * Kp), 0);
        for (int64_t m = 0; m < M; ++m) memcpy(scratch.data() + m * Kp, xs + m * ldx, K * 2);
        xs = scratch.data();
        lds = Kp;
    }
    const Args a{xs, lds, static_cast<const uint16_t*>(wp), 0, static_cast<const uint16_t*>(bias),
                 static_cast<const uint16_t*>(res), ldr, static_cast<uint16_t*>(y), ldy, N, K, scale};
    const int64_t pairs = (N + 31) / 32;
    const float* xp = nullptr;                     // x in fp32 for tile_gemv_int8, else the tile products
    if (I8 && M <= kInt8TileGemvRows) {            // one or two rows: no tile products (see tile_gemv_int8)
        static thread_local std::vector<float> xf;
        xf.assign(static_cast<size_t>(M * Kp), 0.f);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < K; ++k) xf[m * Kp + k] = bf16_to_f32(xs[m * lds + k]);
        xp = xf.data();                // (a thread_local named inside the parallel region is each thread's own)
    }
    auto run = [&](int64_t q0, int64_t q1) {       // outputs [32 q0, 32 q1)
        if (xp == nullptr) amx_range<I8>(a, M, Kp, q0, q1);
        else if (M == 1) tile_gemv_int8<1>(a, xp, Kp, q0, q1);
        else tile_gemv_int8<2>(a, xp, Kp, q0, q1);
    };
    if (threads <= 1 || pairs < 2) {
        run(0, pairs);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t q0 = pairs * t / nt, q1 = pairs * (t + 1) / nt;
        if (q0 < q1) run(q0, q1);
    }
    return 0;
}
}  // extern "C++"

// y = x @ W^T (+ bias) (+ res) with W in the AMX layout (wp, from dsi_pack_amx of an [N, K] weight). Any M.
// Returns 0, or -1 when the CPU has no AMX path.
int dsi_gemm_amx(const void* x, int64_t ldx, const void* wp, const void* bias, const void* res, int64_t ldr, void* y,
                 int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    return gemm_amx<false>(x, ldx, wp, nullptr, bias, res, ldr, y, ldy, M, N, K, threads);
}

// y = (x @ q^T) * scale (+ bias) (+ res) with q int8 in the AMX layout (dsi_pack_amx_int8), scale fp32 [N]. Any M:
// up to kInt8TileGemvRows rows multiply the tiles widened to fp32 (tile_gemv_int8); more rows widen each 32 rows'
// tiles to bf16 (exact) and run the tile products. -1 without AMX.
int dsi_gemm_amx_int8(const void* x, int64_t ldx, const void* wp, const void* scale, const void* bias, const void* res,
                      int64_t ldr, void* y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    return gemm_amx<true>(x, ldx, wp, static_cast<const float*>(scale), bias, res, ldr, y, ldy, M, N, K, threads);
}

// y = x @ dequant(w)^T (+ bias) (+ res) for int4 group-wise weights with G a multiple of 128 (layout as
// dsi_gemv_int4), through AMX tile products (see "AMX-BF16 over int4"). Any M; worth it from a few rows on (one or
// two rows: dsi_gemv_int4). Returns 0, or -1 without AMX or for another group size.
int dsi_gemm_amx_int4(const void* x, int64_t ldx, const void* w, int64_t ldw, const void* scale, int64_t lds, int64_t G,
                      const void* bias, const void* res, int64_t ldr, void* y, int64_t ldy, int64_t M, int64_t N,
                      int64_t K, int threads) {
    if (dsi_gemv_best_isa() < 4 || M < 1 || N < 1 || K < 1 || G % 128 || K % G) return -1;
    if (N * K < kSerialLinearWork) threads = 1;
    const int64_t chunks = K / 128, xblocks = (M + 15) / 16;
    // x laid out per chunk (word 32 i + j = x[4j + i], as rows_int4_bf16 reads it), then each 16 rows' dword p of
    // vector (chunk, i) moved into row p of that B tile (a 16 x 16 dword transpose per tile); blocks over the threads.
    static thread_local std::vector<uint16_t> lin, xv_buf;
    lin.resize(static_cast<size_t>(xblocks * 16 * K) + 32);
    xv_buf.resize(static_cast<size_t>(xblocks * 16 * K) + 32);
    uint16_t* xl = lin.data() + (32 - (reinterpret_cast<uintptr_t>(lin.data()) / 2) % 32) % 32;
    uint16_t* xv = xv_buf.data() + (32 - (reinterpret_cast<uintptr_t>(xv_buf.data()) / 2) % 32) % 32;
    const uint16_t* xs = static_cast<const uint16_t*>(x);
    const int layout_threads = M * K < kSerialLinearWork ? 1 : threads;
#pragma omp parallel for num_threads(layout_threads) schedule(static)
    for (int64_t xb = 0; xb < xblocks; ++xb) {
        const int64_t rows = std::min<int64_t>(16, M - 16 * xb);
        layout_x_int4_bf16(xs + 16 * xb * ldx, ldx, rows, K, xl + 16 * xb * K);
        memset(xl + (16 * xb + rows) * K, 0, static_cast<size_t>((16 - rows) * K) * 2);
        int4_amx_tiles_x(xl + 16 * xb * K, K, chunks, xv + xb * chunks * 2048);
    }
    const Int4AmxArgs a{xv, chunks, static_cast<const uint8_t*>(w), ldw, static_cast<const float*>(scale), lds, G,
                        static_cast<const uint16_t*>(bias), static_cast<const uint16_t*>(res), ldr,
                        static_cast<uint16_t*>(y), ldy, M, N};
    const int64_t pairs = (N + 31) / 32;
    if (threads <= 1 || pairs < 2) {
        int4_amx_range(a, xblocks, 0, pairs);
        return 0;
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t q0 = pairs * t / nt, q1 = pairs * (t + 1) / nt;
        if (q0 < q1) int4_amx_range(a, xblocks, q0, q1);
    }
    return 0;
}

// y[r, :] = round(round(silu(g)) * u) for gate_up rows [g | u] of 2I bf16 (row stride ld), y rows of I (stride
// ldy): F.silu then mul_, as the torch reference computes them (fp32 inside each op, bf16 between).
// AVX512 only (without it torch's vectorised composite is faster than a scalar loop): returns -1 there, else 0.
int dsi_silu_mul_bf16(const void* gate_up, int64_t ld, int64_t rows, int64_t I, void* y, int64_t ldy) {
    if (dsi_gemv_best_isa() < 2) return -1;
    const uint16_t* gu = static_cast<const uint16_t*>(gate_up);
    uint16_t* ys = static_cast<uint16_t*>(y);
    for (int64_t r = 0; r < rows; ++r) silu_mul_avx512(gu + r * ld, gu + r * ld + I, ys + r * ldy, I);
    return 0;
}

// y[r, :] = act(x[r, :]) for `rows` bf16 rows of n (row strides ld, ldy): kind 0 GeLU (erf), 1 GeLU (tanh), 2 ReLU,
// 3 SiLU, 4 ReLU squared; fp32 inside, one rounding (act_row_avx512). Contiguous rows of kSerialActWork elements or more are split
// over `threads` OpenMP threads (each element's result does not depend on the split). AVX512 only: returns -1
// there or for another kind, else 0.
int dsi_act_bf16(const void* x, int64_t ld, int64_t rows, int64_t n, void* y, int64_t ldy, int kind, int threads) {
    if (dsi_gemv_best_isa() < 2 || kind < kGelu || kind > kRelu2) return -1;
    const uint16_t* xs = static_cast<const uint16_t*>(x);
    uint16_t* ys = static_cast<uint16_t*>(y);
    using Row = void (*)(const uint16_t*, uint16_t*, int64_t);
    static const Row row_fn[] = {act_row_avx512<kGelu>, act_row_avx512<kGeluTanh>, act_row_avx512<kRelu>,
                                 act_row_avx512<kSilu>, act_row_avx512<kRelu2>};
    const Row fn = row_fn[kind];
    const int64_t total = rows * n;
    if (threads > 1 && ld == n && ldy == n && total >= kSerialActWork) {   // one run of rows * n, in 16-lane pieces
        const int64_t vecs = (total + 15) / 16;
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t a = vecs * t / nt * 16, b = std::min(total, vecs * (t + 1) / nt * 16);
            if (a < b) fn(xs + a, ys + a, b - a);
        }
        return 0;
    }
    for (int64_t r = 0; r < rows; ++r) fn(xs + r * ld, ys + r * ldy, n);
    return 0;
}

// A gated MLP's activation: y[r, :] = round(round(act(g)) * u) for gate_up rows [g | u] of 2I bf16 (row stride ld), y
// rows of I (stride ldy); kind as dsi_act_bf16 (GeGLU: 0 erf, 1 tanh; 3 SiLU gives dsi_silu_mul_bf16's SwiGLU). Calls
// of kSerialActWork outputs or more are split over `threads` OpenMP threads in pieces of 256 outputs of a row (each
// element's result does not depend on the split). AVX512 only: returns -1 there or for another kind, else 0.
int dsi_gated_act_bf16(const void* gate_up, int64_t ld, int64_t rows, int64_t I, void* y, int64_t ldy, int kind,
                       int threads) {
    if (dsi_gemv_best_isa() < 2 || kind < kGelu || kind > kSilu) return -1;
    const uint16_t* gu = static_cast<const uint16_t*>(gate_up);
    uint16_t* ys = static_cast<uint16_t*>(y);
    using Row = void (*)(const uint16_t*, const uint16_t*, uint16_t*, int64_t);
    static const Row row_fn[] = {gated_row_avx512<kGelu>, gated_row_avx512<kGeluTanh>, gated_row_avx512<kRelu>,
                                 gated_row_avx512<kSilu>};
    const Row fn = row_fn[kind];
    constexpr int64_t kPiece = 256;
    const int64_t per_row = (I + kPiece - 1) / kPiece, pieces = rows * per_row;
    if (threads > 1 && rows * I >= kSerialActWork && pieces > 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < pieces; ++p) {
            const int64_t r = p / per_row, i = p % per_row * kPiece;
            fn(gu + r * ld + i, gu + r * ld + I + i, ys + r * ldy + i, std::min(kPiece, I - i));
        }
        return 0;
    }
    for (int64_t r = 0; r < rows; ++r) fn(gu + r * ld, gu + r * ld + I, ys + r * ldy, I);
    return 0;
}

// LayerNorm of `rows` bf16 rows of n with weight w and bias b (bf16 [n]), fp32 inside and one rounding
// (layer_norm_row_avx512). Decode-sized calls: one thread. AVX512 only: returns -1 there, else 0.
int dsi_layer_norm_bf16(const void* x, int64_t ldx, const void* w, const void* b, void* y, int64_t ldy, int64_t rows,
                        int64_t n, float eps) {
    if (dsi_gemv_best_isa() < 2) return -1;
    const uint16_t* xs = static_cast<const uint16_t*>(x);
    uint16_t* ys = static_cast<uint16_t*>(y);
    for (int64_t r = 0; r < rows; ++r)
        layer_norm_row_avx512(xs + r * ldx, static_cast<const uint16_t*>(w), static_cast<const uint16_t*>(b),
                              ys + r * ldy, n, eps);
    return 0;
}

// Decode attention (one query per row) over a KV cache: out [B, Hq, D] = softmax(scale * q K^T, masked) V for
// grouped KV heads (Hq a multiple of Hkv); softcap > 0: the scores soft-capped first (Gemma 2); sinks (fp32 [Hq] or
// null): a logit per query head in each softmax's denominator (gpt-oss); alibi (fp32 [Hq] slopes or null, BLOOM):
// slope * (j - (L - 1)) added to key j's score after the cap. Units (row, KV head) are split over
// `threads` OpenMP threads. AVX512 only and D <= 512: returns -1 otherwise, else 0.
int dsi_decode_attention_bf16(const void* q, int64_t qb, int64_t qh, const void* k, const void* v, int64_t kb,
                              int64_t kh, int64_t kl, const void* mask, int64_t mb, int64_t ml, void* out, int64_t B,
                              int64_t hq, int64_t hkv, int64_t L, int64_t D, float scale, float softcap,
                              const void* sinks, const void* alibi, int threads) {
    if (dsi_gemv_best_isa() < 2 || attn_unit_for(D) == nullptr) return -1;
    run_attention(AttnArgs{static_cast<const uint16_t*>(q), qb, qh, static_cast<const uint16_t*>(k),
                           static_cast<const uint16_t*>(v), kb, kh, kl, static_cast<const uint8_t*>(mask), mb, ml,
                           static_cast<uint16_t*>(out), B, hq, hkv, L, D, scale, softcap,
                           static_cast<const float*>(sinks), static_cast<const float*>(alibi)}, threads);
    return 0;
}

// ---------------------------------------------------------------- Gated DeltaNet decode step (Qwen3-Next / 3.5)
// One token per row of a linear-attention layer (modules/gated_deltanet.py), after its in_proj GEMM: proj [B, W]
// bf16 rows (stride ld) holding q | k | v (C = 2 Hk Dk + Hv Dv channels) | z (Hv Dv) | b (Hv) | a (Hv). Per row:
// the depthwise convolution over the history [C, K - 1] (bf16, shifted in place) and the new input, fp32
// multiply-adds rounded once to bf16, SiLU rounded to bf16; q, k L2-normed in fp32 (eps 1e-6), q times Dk^-1/2;
// per value head h (key head h / (Hv / Hk)): beta = bf16(sigmoid(b)), g = -exp(a_log) softplus(a + dt_bias) (torch's
// softplus: x above 20 as is), the state [Dk, Dv] (fp32, in place) decayed by exp(g), corrected by
// beta k (v - S^T k)^T and read by q; the output rounded to bf16, RMS-normed (fp32, eps) and rounded, times the
// norm weight (bf16), times SiLU(z) in fp32, rounded: out [B, Hv Dv] bf16 (stride ldo). The roundings are the torch
// path's; the sums run in another order (fp32). Units (row, value head) over `threads` OpenMP threads. AVX512 only:
// returns -1 otherwise (the caller keeps the torch path), else 0.
__attribute__((target("avx512f,avx512bw,avx512vl")))
static void delta_head_avx512(float* S, const float* q, const float* k, const float* v, float decay, float beta,
                              int64_t Dk, int64_t Dv, float* o, float* kv) {
    for (int64_t j = 0; j < Dv; ++j) kv[j] = 0.f, o[j] = 0.f;
    const __m512 dec = _mm512_set1_ps(decay);
    for (int64_t i = 0; i < Dk; ++i) {          // S *= decay; kv += k_i S_i
        float* row = S + i * Dv;
        const __m512 ki = _mm512_set1_ps(k[i]);
        for (int64_t j = 0; j < Dv; j += 16) {
            const __mmask16 m = lanes16(Dv - j);
            const __m512 r = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), dec);
            _mm512_mask_storeu_ps(row + j, m, r);
            _mm512_mask_storeu_ps(kv + j, m, _mm512_fmadd_ps(ki, r, _mm512_maskz_loadu_ps(m, kv + j)));
        }
    }
    for (int64_t j = 0; j < Dv; ++j) kv[j] = (v[j] - kv[j]) * beta;     // delta
    for (int64_t i = 0; i < Dk; ++i) {          // S += k_i delta; o += q_i S_i
        float* row = S + i * Dv;
        const __m512 ki = _mm512_set1_ps(k[i]), qi = _mm512_set1_ps(q[i]);
        for (int64_t j = 0; j < Dv; j += 16) {
            const __mmask16 m = lanes16(Dv - j);
            const __m512 r = _mm512_fmadd_ps(ki, _mm512_maskz_loadu_ps(m, kv + j), _mm512_maskz_loadu_ps(m, row + j));
            _mm512_mask_storeu_ps(row + j, m, r);
            _mm512_mask_storeu_ps(o + j, m, _mm512_fmadd_ps(qi, r, _mm512_maskz_loadu_ps(m, o + j)));
        }
    }
}

static inline float silu_f32(float x) { return x / (1.f + expf(-x)); }

// One channel's convolution step: acc + the history h [K - 1] then the new input x, times w [K], in fp32 in that
// order; the history shifted in place (x joins it).
static inline float conv_push(uint16_t* h, const uint16_t* w, int64_t hist, uint16_t x, float acc) {
    for (int64_t j = 0; j < hist; ++j) acc += bf16_to_f32(h[j]) * bf16_to_f32(w[j]);
    acc += bf16_to_f32(x) * bf16_to_f32(w[hist]);
    for (int64_t j = 0; j + 1 < hist; ++j) h[j] = h[j + 1];
    if (hist > 0) h[hist - 1] = x;
    return acc;
}

// One row of a depthwise causal convolution's decode step, the linear-state mixers' (Gated DeltaNet, Mamba-2): per
// channel c of C, the history h [C, K - 1] (bf16) then the new input x[c], times w [C, K], plus bias[c] (null: none),
// in fp32, rounded to bf16, SiLU rounded: dst[c] (the torch path's roundings); the history shifted in place.
static void conv_silu_row(const uint16_t* x, uint16_t* h, const uint16_t* w, const uint16_t* bias, int64_t C,
                          int64_t K, float* dst) {
    const int64_t hist = K - 1;
    for (int64_t c = 0; c < C; ++c) {
        const float acc = conv_push(h + c * hist, w + c * K, hist, x[c], bias ? bf16_to_f32(bias[c]) : 0.f);
        dst[c] = bf16_to_f32(f32_to_bf16(silu_f32(bf16_to_f32(f32_to_bf16(acc)))));
    }
}

int dsi_gated_delta_step_bf16(const void* proj, int64_t ld, void* history, const void* conv_w, const void* a_log,
                              const void* dt_bias, const void* norm_w, float* state, void* out, int64_t ldo,
                              int64_t B, int64_t Hk, int64_t Hv, int64_t Dk, int64_t Dv, int64_t K, float eps,
                              float beta_scale, int threads) {
    if (dsi_gemv_best_isa() < 2 || Hv % Hk) return -1;
    const int64_t C = 2 * Hk * Dk + Hv * Dv, hist = K - 1, r = Hv / Hk;
    const uint16_t* P = static_cast<const uint16_t*>(proj);
    uint16_t* H = static_cast<uint16_t*>(history);
    const uint16_t* W = static_cast<const uint16_t*>(conv_w);
    uint16_t* O = static_cast<uint16_t*>(out);
    std::vector<float> qkv(static_cast<size_t>(B * C));     // per row: q, k normed (fp32), v (bf16 values)
    const int nt = threads > 0 ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        const uint16_t* x = P + b * ld;
        float* y = qkv.data() + b * C;
        conv_silu_row(x, H + b * C * hist, W, nullptr, C, K, y);
        for (int64_t head = 0; head < 2 * Hk; ++head) {     // q heads, then k heads: L2-normed (q also scaled)
            float* e = y + head * Dk;
            float ss = 0.f;
            for (int64_t i = 0; i < Dk; ++i) ss += e[i] * e[i];
            const float inv = 1.f / sqrtf(ss + 1e-6f) * (head < Hk ? 1.f / sqrtf(static_cast<float>(Dk)) : 1.f);
            for (int64_t i = 0; i < Dk; ++i) e[i] *= inv;
        }
    }
    const uint16_t* AL = static_cast<const uint16_t*>(a_log);
    const uint16_t* DT = static_cast<const uint16_t*>(dt_bias);
    const uint16_t* NW = static_cast<const uint16_t*>(norm_w);
#pragma omp parallel num_threads(nt)
    {
        std::vector<float> o(Dv), kv(Dv), vf(Dv);
#pragma omp for schedule(static)
        for (int64_t u = 0; u < B * Hv; ++u) {
            const int64_t b = u / Hv, hv = u % Hv, hk = hv / r;
            const float* y = qkv.data() + b * C;
            const uint16_t* x = P + b * ld;
            const float beta =     // (rounded as torch.sigmoid stores it; x beta_scale: OLMo Hybrid's 2, exact)
                bf16_to_f32(f32_to_bf16(1.f / (1.f + expf(-bf16_to_f32(x[C + Hv * Dv + hv]))))) * beta_scale;
            const float sp = bf16_to_f32(x[C + Hv * Dv + Hv + hv]) + bf16_to_f32(DT[hv]);
            const float g = -expf(bf16_to_f32(AL[hv])) * (sp > 20.f ? sp : log1pf(expf(sp)));
            for (int64_t j = 0; j < Dv; ++j) vf[j] = y[2 * Hk * Dk + hv * Dv + j];
            delta_head_avx512(state + u * Dk * Dv, y + hk * Dk, y + Hk * Dk + hk * Dk, vf.data(), expf(g), beta,
                              Dk, Dv, o.data(), kv.data());
            float ss = 0.f;                              // the gated RMSNorm of the bf16 output
            for (int64_t j = 0; j < Dv; ++j) {
                o[j] = bf16_to_f32(f32_to_bf16(o[j]));
                ss += o[j] * o[j];
            }
            const float inv = 1.f / sqrtf(ss / static_cast<float>(Dv) + eps);
            const uint16_t* z = x + C + hv * Dv;
            uint16_t* dst = O + b * ldo + hv * Dv;
            for (int64_t j = 0; j < Dv; ++j) {
                const float n = bf16_to_f32(f32_to_bf16(bf16_to_f32(NW[j]) * bf16_to_f32(f32_to_bf16(o[j] * inv))));
                dst[j] = f32_to_bf16(n * silu_f32(bf16_to_f32(z[j])));
            }
        }
    }
    return 0;
}

// ---------------------------------------------------------------- Mamba-2 decode step (Granite 4, Bamba)
// One token per row of a Mamba-2 mixer (modules/gated_deltanet.Mamba2Mixer), after its in_proj GEMM: proj [B, W] bf16
// rows (stride ld) holding z (I = H P) | x B C (C = I + 2 G N channels) | dt (H). Per row: the depthwise convolution
// over the history [C, K - 1] (bf16, shifted in place) and the new input plus its bias, fp32, rounded to bf16, SiLU
// rounded; dt = bf16(softplus(bf16(dt + dt_bias))) within [dt_min, dt_max]; per head h (group h / (H / G)): the state
// [P, N] (fp32, in place) decayed by exp(dt a), a = -exp(a_log), plus dt x B, read by C, plus D x, rounded to bf16;
// then per group of I / G channels the read-out by `gating`: 0 the gated RMSNorm, y silu(z) in fp32, normed, rounded,
// times the weight, rounded (Granite 4); 1 y silu(z) in fp32, rounded, no norm (Falcon-H1 without mamba_rms_norm);
// 2 y normed in fp32, times the weight and silu(z) in fp32, rounded once (Falcon-H1's norm before the gate):
// out [B, I] bf16 (stride ldo). The torch path's roundings; fp32 sums in another order. OpenMP over rows, (row,
// head) units and (row, group) units. AVX512 only (the caller keeps the torch path otherwise): -1, else 0.
// One row p of a head's state: S[n] = S[n] decay + xdt B[n] (fused multiply-add), returning sum_n S[n] C[n] over
// 16 fp32 lanes (the lanes' partial sums then added: another order than a serial sum, within fp32 rounding).
__attribute__((target("avx512f,avx512bw,avx512vl")))
static float ssm_row_avx512(float* S, const float* Bv, const float* Cv, int64_t N, float decay, float xdt) {
    const __m512 dv = _mm512_set1_ps(decay), xv = _mm512_set1_ps(xdt);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 m = lanes16(N - n);
        const __m512 s = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m, Bv + n),
                                         _mm512_mul_ps(_mm512_maskz_loadu_ps(m, S + n), dv));
        _mm512_mask_storeu_ps(S + n, m, s);
        acc = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(m, Cv + n), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

int dsi_mamba2_step_bf16(const void* proj, int64_t ld, void* history, const void* conv_w, const void* conv_b,
                         const void* dt_bias, const void* a_log, const void* d_skip, const void* norm_w, float* state,
                         void* out, int64_t ldo, int64_t B, int64_t H, int64_t P, int64_t G, int64_t N, int64_t K,
                         float eps, float dt_min, float dt_max, int gating, int threads) {
    if (dsi_gemv_best_isa() < 2 || H % G || gating < 0 || gating > 2) return -1;
    const int64_t I = H * P, C = I + 2 * G * N, hist = K - 1, per_group = H / G, gsize = I / G;
    const uint16_t* Pj = static_cast<const uint16_t*>(proj);
    uint16_t* Hs = static_cast<uint16_t*>(history);
    const uint16_t* W = static_cast<const uint16_t*>(conv_w);
    const uint16_t* Wb = static_cast<const uint16_t*>(conv_b);
    const uint16_t* DT = static_cast<const uint16_t*>(dt_bias);
    const uint16_t* AL = static_cast<const uint16_t*>(a_log);
    const uint16_t* Dk = static_cast<const uint16_t*>(d_skip);
    const uint16_t* NW = static_cast<const uint16_t*>(norm_w);
    uint16_t* O = static_cast<uint16_t*>(out);
    std::vector<float> xbc(static_cast<size_t>(B * C)), y(static_cast<size_t>(B * I));
    const int nt = threads > 0 ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        conv_silu_row(Pj + b * ld + I, Hs + b * C * hist, W, Wb, C, K, xbc.data() + b * C);
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * H; ++u) {
        const int64_t b = u / H, hh = u % H, g = hh / per_group;
        const float* row = xbc.data() + b * C;
        const float* xs = row + hh * P;
        const float* Bv = row + I + g * N;
        const float* Cv = row + I + G * N + g * N;
        const float s = bf16_to_f32(f32_to_bf16(bf16_to_f32(Pj[b * ld + I + C + hh]) + bf16_to_f32(DT[hh])));
        float dt = bf16_to_f32(f32_to_bf16(s > 20.f ? s : log1pf(expf(s))));
        dt = dt < dt_min ? dt_min : (dt > dt_max ? dt_max : dt);
        const float decay = expf(dt * -expf(bf16_to_f32(AL[hh]))), dskip = bf16_to_f32(Dk[hh]);
        float* S = state + u * P * N;
        for (int64_t p = 0; p < P; ++p) {
            const float acc = ssm_row_avx512(S + p * N, Bv, Cv, N, decay, xs[p] * dt);
            y[b * I + hh * P + p] = bf16_to_f32(f32_to_bf16(acc + xs[p] * dskip));
        }
    }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * G; ++u) {
        const int64_t b = u / G, g = u % G;
        const uint16_t* z = Pj + b * ld + g * gsize;
        float* yg = y.data() + b * I + g * gsize;
        uint16_t* o = O + b * ldo + g * gsize;
        if (gating == 1) {
            for (int64_t i = 0; i < gsize; ++i) o[i] = f32_to_bf16(yg[i] * silu_f32(bf16_to_f32(z[i])));
            continue;
        }
        float ss = 0.f;
        for (int64_t i = 0; i < gsize; ++i) {
            if (gating == 0) yg[i] *= silu_f32(bf16_to_f32(z[i]));
            ss += yg[i] * yg[i];
        }
        const float inv = 1.f / sqrtf(ss / static_cast<float>(gsize) + eps);
        if (gating == 2) {
            for (int64_t i = 0; i < gsize; ++i)
                o[i] = f32_to_bf16(bf16_to_f32(NW[g * gsize + i]) * (yg[i] * inv) * silu_f32(bf16_to_f32(z[i])));
            continue;
        }
        for (int64_t i = 0; i < gsize; ++i)
            o[i] = f32_to_bf16(bf16_to_f32(NW[g * gsize + i]) * bf16_to_f32(f32_to_bf16(yg[i] * inv)));
    }
    return 0;
}

// ---------------------------------------------------------------- Mamba-1 decode step (Mamba, FalconMamba, Jamba)
// Two calls around the x_proj / dt_proj GEMVs (modules/gated_deltanet.Mamba1Mixer), one token per row.
// dsi_mamba1_conv_bf16: x's depthwise convolution over the history [B, I, K - 1] (bf16, shifted in place) and the new
// input (proj rows' first I values, stride ld) plus the bias, fp32, rounded, SiLU, rounded: xc [B, I] bf16.
int dsi_mamba1_conv_bf16(const void* proj, int64_t ld, void* history, const void* conv_w, const void* conv_b,
                         void* xc, int64_t B, int64_t I, int64_t K, int threads) {
    if (dsi_gemv_best_isa() < 2 || K < 1) return -1;
    const uint16_t* Pj = static_cast<const uint16_t*>(proj);
    uint16_t* Hs = static_cast<uint16_t*>(history);
    const uint16_t* W = static_cast<const uint16_t*>(conv_w);
    const uint16_t* Wb = static_cast<const uint16_t*>(conv_b);
    uint16_t* X = static_cast<uint16_t*>(xc);
    const int64_t hist = K - 1, block = 256, blocks = (I + block - 1) / block;
    const int nt = threads > 0 ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * blocks; ++u) {
        const int64_t b = u / blocks, c0 = u % blocks * block, c1 = std::min(I, c0 + block);
        for (int64_t c = c0; c < c1; ++c) {
            const float acc = conv_push(Hs + (b * I + c) * hist, W + c * K, hist, Pj[b * ld + c],
                                        Wb ? bf16_to_f32(Wb[c]) : 0.f);
            X[b * I + c] = f32_to_bf16(silu_f32(bf16_to_f32(f32_to_bf16(acc))));
        }
    }
    return 0;
}

// dsi_mamba1_scan_bf16: per row and channel i, for each of T tokens in order: dt = softplus(dt_raw + dt_bias) (fp32),
// the state row [N] (fp32, in place) decayed by exp(dt a), a = -exp(a_log[i]), plus (dt B) x; y = sum_n bf16(S[n]) C[n]
// rounded to bf16 (the torch path's bf16 product), then (y + x D) silu(z) rounded: out [B, T, I] bf16. x, dt [B, T, I]
// bf16 (contiguous), z and B | C rows with row / token strides (ldz, ldzt; ldbc, ldbct). a computed once per call, B
// and C widened once per token; N in 16-lane vectors (exp16: Cephes' expf); the state stays in registers over the
// tokens (a prompt's scan in one call; a decode step is T = 1).
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline __m512 round_bf16x16(__m512 v) {   // to the nearest bf16 (ties to even), as fp32 lanes
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

__attribute__((target("avx512f,avx512bw,avx512vl")))
int dsi_mamba1_scan_bf16(const void* xc, const void* zp, int64_t ldz, int64_t ldzt, const void* dtp, const void* bcp,
                         int64_t ldbc, int64_t ldbct, const void* dt_bias, const void* a_log, const void* d_skip,
                         float* state, void* out, int64_t B, int64_t T, int64_t I, int64_t N, int threads) {
    if (dsi_gemv_best_isa() < 2) return -1;
    const uint16_t* X = static_cast<const uint16_t*>(xc);
    const uint16_t* Z = static_cast<const uint16_t*>(zp);
    const uint16_t* DTr = static_cast<const uint16_t*>(dtp);
    const uint16_t* BC = static_cast<const uint16_t*>(bcp);
    const uint16_t* DB = static_cast<const uint16_t*>(dt_bias);
    const uint16_t* AL = static_cast<const uint16_t*>(a_log);
    const uint16_t* Dk = static_cast<const uint16_t*>(d_skip);
    uint16_t* O = static_cast<uint16_t*>(out);
    const int64_t Np = (N + 15) / 16 * 16;           // lanes per channel, padded (a = 0, B = C = 0 in the padding)
    std::vector<float> A(static_cast<size_t>(I * Np), 0.f), BCf(static_cast<size_t>(B * T * 2 * Np), 0.f);
    const int nt = threads > 0 ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < I; ++i)
        for (int64_t n = 0; n < N; n += 16) {
            const __mmask16 m = lanes16(N - n);
            _mm512_mask_storeu_ps(A.data() + i * Np + n, m,
                                  _mm512_sub_ps(_mm512_setzero_ps(), exp16(widen16_mask(AL + i * N + n, m))));
        }
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t n = 0; n < N; ++n) {
                const uint16_t* row = BC + b * ldbc + t * ldbct;
                BCf[(b * T + t) * 2 * Np + n] = bf16_to_f32(row[n]);
                BCf[(b * T + t) * 2 * Np + Np + n] = bf16_to_f32(row[N + n]);
            }
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * I; ++u) {
        const int64_t b = u / I, i = u % I;
        const float* a = A.data() + i * Np;
        const float bias = bf16_to_f32(DB[i]), dskip = bf16_to_f32(Dk[i]);
        float* S = state + u * N;
        for (int64_t t = 0; t < T; ++t) {
            const int64_t at = (b * T + t) * I + i;
            const float s = bf16_to_f32(DTr[at]) + bias;
            const float dt = s > 20.f ? s : log1pf(expf(s));
            const float x = bf16_to_f32(X[at]);
            const __m512 dtv = _mm512_set1_ps(dt), xv = _mm512_set1_ps(x);
            const float* Bv = BCf.data() + (b * T + t) * 2 * Np;
            const float* Cv = Bv + Np;
            __m512 acc = _mm512_setzero_ps();
            for (int64_t n = 0; n < N; n += 16) {
                const __mmask16 m = lanes16(N - n);
                const __m512 dA = exp16(_mm512_mul_ps(dtv, _mm512_loadu_ps(a + n)));
                const __m512 dBx = _mm512_mul_ps(_mm512_mul_ps(dtv, _mm512_loadu_ps(Bv + n)), xv);
                const __m512 st = _mm512_add_ps(_mm512_mul_ps(dA, _mm512_maskz_loadu_ps(m, S + n)), dBx);
                _mm512_mask_storeu_ps(S + n, m, st);
                acc = _mm512_fmadd_ps(round_bf16x16(st), _mm512_loadu_ps(Cv + n), acc);
            }
            const float y = bf16_to_f32(f32_to_bf16(_mm512_reduce_add_ps(acc)));
            O[at] = f32_to_bf16((y + x * dskip) * silu_f32(bf16_to_f32(Z[b * ldz + t * ldzt + i])));
        }
    }
    return 0;
}

// LFM2's gated short convolution for one token per row: proj rows (stride ld) B | C | x of C channels each, the
// history [B, C, K - 1] of B * x (bf16, shifted in place), weights [C, K]; out (row stride ldo) = C * conv(B * x),
// each product and the convolution rounded to bf16 as the torch ops round them (the convolution's fp32 sum in
// their order). Blocks of 256 channels of the rows split over `threads` OpenMP threads.
int dsi_short_conv_step_bf16(const void* proj, int64_t ld, void* history, const void* conv_w, void* out, int64_t ldo,
                             int64_t B, int64_t C, int64_t K, int threads) {
    if (dsi_gemv_best_isa() < 2 || K < 1) return -1;
    const uint16_t* Pj = static_cast<const uint16_t*>(proj);
    uint16_t* Hs = static_cast<uint16_t*>(history);
    const uint16_t* W = static_cast<const uint16_t*>(conv_w);
    uint16_t* O = static_cast<uint16_t*>(out);
    const int64_t hist = K - 1, block = 256, blocks = (C + block - 1) / block;
    const int nt = threads > 0 ? threads : 1;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t u = 0; u < B * blocks; ++u) {
        const int64_t b = u / blocks, c0 = u % blocks * block, c1 = std::min(C, c0 + block);
        const uint16_t* row = Pj + b * ld;
        for (int64_t c = c0; c < c1; ++c) {
            const uint16_t bx = f32_to_bf16(bf16_to_f32(row[c]) * bf16_to_f32(row[2 * C + c]));
            const float acc = conv_push(Hs + (b * C + c) * hist, W + c * K, hist, bx, 0.f);
            O[b * ldo + c] = f32_to_bf16(bf16_to_f32(row[C + c]) * bf16_to_f32(f32_to_bf16(acc)));
        }
    }
    return 0;
}

// ---------------------------------------------------------------- streaming-read probe (benchmarks)
// XOR of `bytes` (a multiple of 64) read front to back on `threads` OpenMP threads, each a contiguous range, with
// a software prefetch 4 KiB ahead: the read bandwidth the benchmarks' utilisation is measured against (torch's
// x.sum() reads ~15% slower than this on the 2-core machine, so it would flatter every kernel measured by it).
__attribute__((target("avx512f")))
static uint64_t stream_xor_avx512(const uint8_t* p, int64_t a, int64_t b) {
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t i = a; i + 256 <= b; i += 256) {
        _mm_prefetch(reinterpret_cast<const char*>(p + i + 4096), _MM_HINT_T0);
        s0 = _mm512_xor_si512(s0, _mm512_loadu_si512(p + i));
        s1 = _mm512_xor_si512(s1, _mm512_loadu_si512(p + i + 64));
        s2 = _mm512_xor_si512(s2, _mm512_loadu_si512(p + i + 128));
        s3 = _mm512_xor_si512(s3, _mm512_loadu_si512(p + i + 192));
    }
    return _mm512_reduce_or_epi64(_mm512_xor_si512(_mm512_xor_si512(s0, s1), _mm512_xor_si512(s2, s3)));
}

static uint64_t stream_xor_plain(const uint8_t* p, int64_t a, int64_t b) {
    uint64_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = a; i + 64 <= b; i += 64)
        for (int j = 0; j < 8; ++j) {
            uint64_t v;
            memcpy(&v, p + i + 8 * j, 8);
            s[j] ^= v;
        }
    return s[0] ^ s[1] ^ s[2] ^ s[3] ^ s[4] ^ s[5] ^ s[6] ^ s[7];
}

uint64_t dsi_stream_read(const void* data, int64_t bytes, int threads) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    const bool wide = dsi_gemv_best_isa() >= 2;
    uint64_t total = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(^ : total)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int64_t blocks = bytes / 256, a = blocks * t / nt * 256, b = blocks * (t + 1) / nt * 256;
        total ^= wide ? stream_xor_avx512(p, a, b) : stream_xor_plain(p, a, b);
    }
    return total;
}

// ---------------------------------------------------------------- a decode step through every block in one call
// The engine's CPU path for one bf16 decode step (T = 1, B rows, the engine's static KV cache), block by block:
//   x = norm1(h); qkv = x Wqkv^T (+b); [q/k head norms]; rotary + K/V append; a = attention over the cache;
//   h = a Wo^T (+b) (+h on the rank that adds the residual) [+ all-reduce]; x = norm2(h);
//   h = act(x Wgu^T (+b)) Wd^T (+b) (+h) [+ all-reduce]
// with the same kernels and the same roundings as the Python calls it replaces (modules/transformer.py), so
// the result is bit-identical; what it saves is ~100 us of Python and torch dispatch per block. The norms are
// RMSNorms (Llama; Gemma's (1 + w) in fp32) or LayerNorms with biases (the GPT families); act is SwiGLU or GeGLU
// over gate | up or a plain activation of up; with the parallel residual (GPTDecoderLayer.parallel) the MLP reads
// norm2 of the block's input instead (norm1's output itself when the block has one shared norm), and down adds
// attention's output. Gemma 2 / 3's sandwich blocks (SandwichDecoderLayer) norm the attention's and the MLP's outputs
// before their residual adds (o and down then add no residual): h = h + norm_a(o), h = h + norm_m(down); Gemma 2's
// scores are soft-capped, Gemma 3's sliding-window layers rotate by a table of their own. Gemma 4's layers each have
// their own head dim, KV heads and MLP width; v is RMS-normed per head; its last layers compute queries only and read
// an earlier layer's cache; after the MLP, h = h + norm_p(proj(act(gate(h)) * per-layer row)), then h = h * scalar.
struct DsiLinear {
    const void* w; const void* bias;   // weight (AMX layout, or row-major with row stride ldw); bias or null
    int64_t ldw, N, K;
    int64_t packed;                    // 0: row-major (dsi_gemv_bf16), 1: AMX layout (dsi_gemm_amx), 2: int8 row-major
                                       // (dsi_gemv_int8), 3: int8 AMX layout (dsi_gemm_amx_int8), 4: int4 group-wise
                                       // (dsi_gemv_int4: packed [N, K / 2] with row stride ldw bytes)
    int64_t add_residual;              // add the residual stream (tp rank 0, or no tensor parallelism)
    int64_t reduce;                    // sum over the tensor-parallel group afterwards (row-parallel o / down)
    const void* scale;                 // int8: fp32 scale per output row; int4: fp32 [N, K / group]; else null
    int64_t group;                     // int4: inputs per scale
    int64_t amx_rows;                  // int4: rows from which dsi_gemm_amx_int4 runs (0: never; modules/linear.py)
};

struct DsiLayer {
    DsiLinear qkv, o, gate_up, down;
    const void* input_norm; const void* post_norm;   // norm weights [hidden]; post_norm null: one shared norm
                                                     // (parallel residual only: GPT-J, Phi)
    const void* input_bias; const void* post_bias;   // LayerNorm biases [hidden] (DsiStack.layer_norm), else null
    const void* q_norm; const void* k_norm;   // per-head RMSNorm weights [D] (Qwen3, Gemma 3) or null
    void* k_cache; void* v_cache;             // [B_max, Hkv, S, D] with strides (cb, ch, D, 1)
    int64_t cb, ch;
    int64_t sliding;                          // attends through the window mask when one is given (and rotates by
                                              // the sliding layers' table when one is given)
    const void* attn_out_norm; const void* mlp_out_norm;   // sandwich block (Gemma 2 / 3): RMSNorm weights [hidden]
                                                           // of attention's / the MLP's output; null: pre-norm block
    const void* alibi;                        // ALiBi slopes fp32 [hq] of this rank's heads (BLOOM), or null
    // Gemma 4: each layer's own shape, v's norm, K/V read from an earlier layer, the per-layer input and the scalar
    int64_t hkv, head_dim, inter;             // this layer's KV heads, head dim and MLP width (the stack's: maxima)
    const void* v_norm;                       // RMSNorm weight [head_dim] (norm_f32) of the v heads, or null
    int64_t shared_kv;                        // 1: queries only (qkv's rows are q's) over the K/V that k_cache /
                                              // v_cache (an earlier layer's) hold through column col; nothing written
    DsiLinear pl_gate, pl_proj;               // per-layer input (pl_gate.w null: none): h = h + norm_p(proj(act(gate(h))
    const void* pl_norm;                      // * row)), row = this layer's row pl_index of DsiStack.per_layer
    int64_t pl_index;
    const void* scalar;                       // bf16 [1]: h = h * scalar at the block's end, or null
};

struct DsiStack {
    int64_t num_layers, hidden, hq, hkv, head_dim, inter;   // this rank's heads and intermediate columns
    double eps, scale;
    int64_t threads, isa;                                  // OpenMP threads; the row-major kernel's path
    float* slots; int64_t capacity; int64_t* flags;        // parallel/shm.py's exchange (slots null: no TP)
    int64_t tp_size, tp_rank;
    double timeout_s;
    int64_t layer_norm;    // 0: RMSNorms (dsi_rms_norm_bf16); 1: LayerNorms with biases (dsi_layer_norm_bf16)
    int64_t parallel;      // 1: h + attn(norm1(h)) + mlp(norm2(h)) (GPT-NeoX, GPT-J, Phi); 0: sequential
    int64_t mlp_act;       // dsi_act_bf16's kind: of gate times up (gated), else of up
    int64_t rotary_dim;    // R: cos / sin rows [B, R], the first R dims of each head rotate; 0: no rotary
    int64_t gated;         // 1: gate_up holds gate | up (2 inter rows), act(gate) * up (SwiGLU, GeGLU)
    int64_t norm_f32;      // 1: RMSNorm weights (q / k norms too) fp32, Gemma's (1 + w): dsi_rms_norm_bf16's w_f32
    double softcap;        // > 0: attention scores soft-capped (Gemma 2); 0: none
    int64_t srotary_dim;   // width of the sliding layers' own cos / sin rows (scos / ssin) where they are given
    const void* per_layer; // Gemma 4's per-layer inputs of the step, bf16 rows of pl_dim: row b's layer i at
    int64_t plb, pll;      // per_layer + b * plb + i * pll (elements), or null
    int64_t pl_dim, pl_act;   // their width; dsi_act_bf16's kind of the gate
};

static int stack_linear(const DsiStack* st, const DsiLinear& lin, const uint16_t* x, int64_t M, const uint16_t* h,
                        uint16_t* y) {
    const int threads = static_cast<int>(st->threads);
    const uint16_t* res = lin.add_residual ? h : nullptr;
    if (lin.packed == 2)
        return dsi_gemv_int8(x, lin.K, lin.w, lin.ldw, lin.scale, lin.bias, res, lin.N, y, lin.N, M, lin.N, lin.K, threads);
    if (lin.packed == 3)
        return dsi_gemm_amx_int8(x, lin.K, lin.w, lin.scale, lin.bias, res, lin.N, y, lin.N, M, lin.N, lin.K, threads);
    if (lin.packed == 4 && lin.amx_rows && M >= lin.amx_rows)
        return dsi_gemm_amx_int4(x, lin.K, lin.w, lin.ldw, lin.scale, lin.K / lin.group, lin.group, lin.bias, res,
                                 lin.N, y, lin.N, M, lin.N, lin.K, threads);
    if (lin.packed == 4)
        return dsi_gemv_int4(x, lin.K, lin.w, lin.ldw, lin.scale, lin.K / lin.group, lin.group, lin.bias, res, lin.N, y,
                             lin.N, M, lin.N, lin.K, threads, static_cast<int>(st->isa));
    if (lin.packed) return dsi_gemm_amx(x, lin.K, lin.w, lin.bias, res, lin.N, y, lin.N, M, lin.N, lin.K, threads);
    return dsi_gemv_bf16(x, lin.K, lin.w, lin.ldw, lin.bias, res, lin.N, y, lin.N, M, lin.N, lin.K, threads,
                         static_cast<int>(st->isa));
}

// h [B, hidden] bf16: the residual stream in, the last block's output out (the final norm is the caller's).
// cos / sin [B, rotary_dim]; scos / ssin: the same for the sliding-window layers (Gemma 3), or null (cos / sin for
// every layer); the step writes cache column col and attends over columns [0, col]; mask / wmask:
// bool [B, col + 1] rows (strides mb / wmb, column strides ml / wml) or null. shm_step: the exchange's call counter
// (in / out); shm_seconds: time spent in exchanges, waiting included, is added to it.
// Returns 0; 1 when a peer did not reach an all-reduce within the timeout; 2 when a linear call failed (or a layer
// with a per-layer input met a step without them); 3 without AVX512.
int dsi_decode_stack(const DsiStack* st, const DsiLayer* layers, void* h_, int64_t B, const void* cos, const void* sin,
                     const void* scos, const void* ssin, int64_t col, const void* mask, int64_t mb, int64_t ml,
                     const void* wmask, int64_t wmb, int64_t wml,
                     int64_t* shm_step, double* shm_seconds) {
    // (hkv, head_dim and inter of the stack: the largest of any layer's, which size the buffers; each layer its own)
    const int64_t H = st->hidden, hq = st->hq, L = col + 1, P = st->per_layer ? st->pl_dim : 0;
    if (dsi_gemv_best_isa() < 2 || attn_unit_for(st->head_dim) == nullptr) return 3;   // AVX512 only (caller checks)
    uint16_t* h = static_cast<uint16_t*>(h_);
    static thread_local std::vector<uint16_t> buf;
    {
        const int64_t heads = hq + 2 * st->hkv, D = st->head_dim;
        buf.resize(static_cast<size_t>(B * (3 * H + heads * D + (hq + st->hkv) * D + hq * D + 3 * st->inter + 2 * P)));
    }
    uint16_t* x = buf.data();
    uint16_t* x2 = x + B * H;          // norm2 of the block's input (parallel residual with two norms), or the normed
                                       // output of a sandwich block's attention / MLP
    uint16_t* y = x2 + B * H;
    uint16_t* qkv = y + B * H;
    uint16_t* q = qkv + B * (hq + 2 * st->hkv) * st->head_dim;
    uint16_t* k = q + B * hq * st->head_dim;
    uint16_t* att = k + B * st->hkv * st->head_dim;
    uint16_t* gu = att + B * hq * st->head_dim;
    uint16_t* act = gu + B * 2 * st->inter;
    uint16_t* pg = act + B * st->inter;   // the per-layer input's gate output, then act(gate) * row
    uint16_t* pa = pg + B * P;
    auto all_reduce = [&](uint16_t* v) -> int {
        timespec t0{}, t1{};
        clock_gettime(CLOCK_MONOTONIC, &t0);
        const int64_t s = ++*shm_step;
        const int rc = dsi_shm_exchange(v, 1, B * H, st->slots + (s % 2) * st->tp_size * st->capacity, st->capacity,
                                        st->flags, static_cast<int>(st->tp_size), static_cast<int>(st->tp_rank), s,
                                        st->timeout_s, 1);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        *shm_seconds += (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
        return rc;
    };
    const float eps = static_cast<float>(st->eps);
    const int w_f32 = static_cast<int>(st->norm_f32);
    auto norm = [&](const void* w, const void* bias, uint16_t* out) {   // of the residual stream h
        if (st->layer_norm) dsi_layer_norm_bf16(h, H, w, bias, out, H, B, H, eps);
        else dsi_rms_norm_bf16(h, H, w, w_f32, out, H, B, H, eps);
    };
    // h = h + y (after the block's output norm w when given: sandwich), each element rounded once, as torch's add;
    // otherwise y already holds h + output (the residual added in the linear)
    auto add_output = [&](const void* w) {
        if (!w) {
            memcpy(h, y, B * H * sizeof(uint16_t));
            return;
        }
        dsi_rms_norm_bf16(y, H, w, w_f32, x2, H, B, H, eps);
        for (int64_t i = 0; i < B * H; ++i) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(x2[i]));
    };
    for (int64_t l = 0; l < st->num_layers; ++l) {
        const DsiLayer& ly = layers[l];
        const int64_t hkv = ly.hkv, D = ly.head_dim, I = ly.inter, heads = hq + 2 * hkv;
        norm(ly.input_norm, ly.input_bias, x);
        if (stack_linear(st, ly.qkv, x, B, h, qkv)) return 2;
        const uint16_t* mlp_in = x;    // parallel with one shared norm: norm1's output feeds the MLP too
        if (st->parallel && ly.post_norm) {
            norm(ly.post_norm, ly.post_bias, x2);
            mlp_in = x2;
        }
        // (a layer reading an earlier layer's K/V: its qkv rows are q's alone, normed and rotated as q heads)
        const int64_t own_kv = ly.shared_kv ? 0 : hkv;
        if (ly.q_norm) dsi_head_norms_bf16(qkv, B, hq, own_kv, D, ly.q_norm, ly.k_norm, w_f32, eps);
        if (ly.v_norm && own_kv)                      // Gemma 4: v RMS-normed per head too
            for (int64_t b = 0; b < B; ++b) {
                uint16_t* v = qkv + b * heads * D + (hq + hkv) * D;
                dsi_rms_norm_bf16(v, D, ly.v_norm, w_f32, v, D, hkv, D, eps);
            }
        const bool own_table = ly.sliding && scos;   // Gemma 3 / 4's sliding layers: their own rope table
        dsi_rotary_write_kv_bf16(qkv, own_table ? scos : cos, own_table ? ssin : sin, B, 1, hq, own_kv, D,
                                 own_table ? st->srotary_dim : st->rotary_dim, q, k,
                                 ly.shared_kv ? nullptr : ly.k_cache, ly.shared_kv ? nullptr : ly.v_cache, ly.cb, ly.ch,
                                 col);
        const bool win = ly.sliding && wmask;
        run_attention(AttnArgs{q, hq * D, D, static_cast<const uint16_t*>(ly.k_cache),
                               static_cast<const uint16_t*>(ly.v_cache), ly.cb, ly.ch, D,
                               static_cast<const uint8_t*>(win ? wmask : mask), win ? wmb : mb, win ? wml : ml, att,
                               B, hq, hkv, L, D, static_cast<float>(st->scale), static_cast<float>(st->softcap),
                               nullptr, static_cast<const float*>(ly.alibi)},
                      static_cast<int>(st->threads));
        if (stack_linear(st, ly.o, att, B, h, y)) return 2;
        if (ly.o.reduce && all_reduce(y)) return 1;
        add_output(ly.attn_out_norm);    // sequential: h + attn; parallel: the same, which down then adds
        if (!st->parallel) norm(ly.post_norm, ly.post_bias, x);
        if (stack_linear(st, ly.gate_up, mlp_in, B, h, gu)) return 2;
        if (st->gated && st->mlp_act == kSilu) dsi_silu_mul_bf16(gu, 2 * I, B, I, act, I);
        else if (st->gated) dsi_gated_act_bf16(gu, 2 * I, B, I, act, I, static_cast<int>(st->mlp_act),
                                               static_cast<int>(st->threads));
        else dsi_act_bf16(gu, I, B, I, act, I, static_cast<int>(st->mlp_act), static_cast<int>(st->threads));
        if (stack_linear(st, ly.down, act, B, h, y)) return 2;
        if (ly.down.reduce && all_reduce(y)) return 1;
        add_output(ly.mlp_out_norm);
        if (ly.pl_gate.w) {    // Gemma 4's per-layer input: each step rounded as the torch ops of PerLayerInputLayer
            if (!st->per_layer || ly.pl_gate.N != P) return 2;
            if (stack_linear(st, ly.pl_gate, h, B, h, pg)) return 2;
            dsi_act_bf16(pg, P, B, P, pa, P, static_cast<int>(st->pl_act), static_cast<int>(st->threads));
            const uint16_t* rows = static_cast<const uint16_t*>(st->per_layer) + ly.pl_index * st->pll;
            for (int64_t b = 0; b < B; ++b)
                for (int64_t i = 0; i < P; ++i)
                    pa[b * P + i] = f32_to_bf16(bf16_to_f32(pa[b * P + i]) * bf16_to_f32(rows[b * st->plb + i]));
            if (stack_linear(st, ly.pl_proj, pa, B, h, y)) return 2;
            add_output(ly.pl_norm);
        }
        if (ly.scalar) {
            const float s = bf16_to_f32(*static_cast<const uint16_t*>(ly.scalar));
            for (int64_t i = 0; i < B * H; ++i) h[i] = f32_to_bf16(bf16_to_f32(h[i]) * s);
        }
    }
    return 0;
}

}  // extern "C"
