// The fast decode engine's non-matmul work for one new token per row, fused.
//
// A decode step of a small Llama on CPU spends as much time between its matmuls as in
// them: norms, residual adds, rotary embedding, the cache write, one-row attention and
// SiLU-times-up are ~25 PyTorch ops a layer, each a few microseconds of dispatch over a
// few kilobytes of data, and PyTorch's flash attention kernel takes ~200-300 us a call
// at batch 16 for ~2 MB of keys and values (these kernels: ~90-120 us). Here each group
// is one call. The attention and SiLU loops split their rows over PyTorch's own OpenMP
// threads (this library links the same libgomp, so no second pool competes for the
// cores; `ucai.native_decode` passes 1 thread under another OpenMP runtime); the norm,
// a few kilobytes, runs on the calling thread.
//
// On a CPU with AMX bf16 the step's projections run here too (`ucai_tiles_linear_bf16`,
// at the end of this file): oneDNN's packed matmul streams their weights at about half
// the machine's read bandwidth at a decode step's few rows.
//
// Every function exists for float32 (suffix _f32) and bfloat16 (_bf16, raw uint16 bits).
// Rounding follows PyTorch's bf16 ops: each elementwise op computes in float32 and
// rounds its result to bf16 (round to nearest even), so the norms' output, residual
// sums, rotary embedding and SiLU-times-up are the values transformers' own ops give,
// up to the order of a norm's sum of squares and the exp implementation. Attention
// follows PyTorch's CPU flash kernel for one block of keys: float32 scores (scaled, plus
// the mask), exp(score - max) summed in float32 but rounded to the cache dtype before it
// weights the values, the float32 sum divided out at the end and the output rounded.
// (Keeping those weights in float32 is more precise but drifts further from the
// model's own forward, which is what faithfulness is measured against.) Two
// differences remain: PyTorch takes the exact exp for the last (length mod vector
// width) keys, and beyond 512 keys it splits them into blocks with an online softmax;
// here one pass with one exp covers every key. With AVX-512 the bf16 softmax runs 16
// scores a vector (the scalar loop does not vectorise), its float32 total summed in 16
// lanes. (Scores summed by VDPBF16PS instead, in pairs of bf16 products, drifted
// further from the forward than generate: mean |Δ log-prob| 2.41e-2 against 2.36e-2
// on benchmarks/generation.py's work, 2.33e-2 with float32 FMAs as here.)
//
// Shapes (row-major, contiguous unless a row stride is given):
//   hidden, delta, normed: (rows, width)
//   q / k / v: (B, heads * D) rows with their own row strides (views of a fused matmul)
//   cos, sin_signed: (B, D); sin_signed is sin with its first half negated
//   keys, values: (B, KVH, capacity, D) caches; mask: (B, mask_stride) additive or null

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <type_traits>
#include <vector>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>
#define UCAI_TILES 1
#endif

namespace {

inline float bf16_to_float(uint16_t bits) { return __builtin_bit_cast(float, static_cast<uint32_t>(bits) << 16); }

// PyTorch's c10::BFloat16 conversion: round to nearest even, NaN kept quiet. Written
// without branches so that loops over it vectorise.
inline uint16_t float_to_bf16(float value) {
    const uint32_t word = __builtin_bit_cast(uint32_t, value);
    const uint32_t rounded = (word + 0x7FFFu + ((word >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>(value != value ? 0x7FC0u : rounded);
}

// exp(x) in float32 to about 1 ulp (Cephes' polynomial on x - n ln 2, scaled by 2^n),
// inlined and branch-free so that loops over it vectorise (a libm call per element
// does not, and neither does floor without -fno-trapping-math: n is rounded by adding
// and subtracting 1.5 * 2^23). PyTorch's own vectorised exp (Sleef, 1 ulp) differs in
// the last bit at most, which a bf16 result rounds away almost always. exp(-inf) is 0.
inline float fast_exp(float x) {
    const float clamped = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    const float magic = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
    const float shifted = clamped * 1.44269504088896341f + magic;
    const float n = shifted - magic;
    const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const int32_t exponent = __builtin_bit_cast(int32_t, shifted) - __builtin_bit_cast(int32_t, magic);
    const float scale = __builtin_bit_cast(float, (exponent + 127) << 23);
    return x != x ? x : (x < -87.3f ? 0.f : (x > 88.3f ? INFINITY : p * scale));
}

// PyTorch's Vectorized<float>::exp_u20 (about 20 ulp), which its CPU flash-attention
// kernel uses for the softmax: the same constants and fused multiply-adds, so that the
// attention weights round to the same bf16 values as the model's own forward.
inline float exp_u20(float x) {
    const float ln_flt_min = __builtin_bit_cast(float, 0xc2aeac50u);
    const float ln_flt_max = __builtin_bit_cast(float, 0x42b17218u);
    const float src = std::fmax(std::fmin(x, ln_flt_max), ln_flt_min);
    const float fx = std::floor(std::fma(src, __builtin_bit_cast(float, 0x3fb8aa3bu), 0.5f));
    const float r = std::fma(-fx, __builtin_bit_cast(float, 0x3f317218u), src);
    float p = std::fma(r, 0.00828929059f, 0.0418978221f);
    p = std::fma(r, p, 0.166676521f);
    p = std::fma(r, p, 0.499991506f);
    p = std::fma(r, p, 0.999999701f);
    p = std::fma(r, p, 1.f);
    const float two_pow = __builtin_bit_cast(float, (static_cast<int32_t>(fx - 1.f) + 127) << 23);
    return x < ln_flt_min ? 0.f : p * two_pow * 2.f;
}

// PyTorch's Vectorized<float>::fexp_u20: 2^(x log2 e) from the float's bit layout with
// a cubic correction of the fraction (Malossi et al., "Fast exponential computation
// on SIMD architectures"), about 1e-3 relative error, which PyTorch's CPU flash
// attention uses for bf16 inputs, whose weights it rounds to bf16 anyway.
inline float fexp_u20(float x) {
    const float ln_flt_min = __builtin_bit_cast(float, 0xc2aeac50u);
    const float ln_flt_max = __builtin_bit_cast(float, 0x42b17218u);
    // Computed on x clamped to the representable range (bit-identical there) so that the
    // float-to-int conversion below never sees NaN or an out-of-range value (undefined
    // in C++); the selects at the end give 0 and infinity outside it, as PyTorch's masks do.
    const float src = std::fmax(std::fmin(x, ln_flt_max), ln_flt_min) * __builtin_bit_cast(float, 0x3fb8aa3bu);
    const float fraction = src - std::floor(src);
    float correction = std::fma(fraction, -0.079204240219773236f, -0.22433836478672356f);
    correction = std::fma(fraction, correction, 0.30354260500649682f);
    correction = std::fma(fraction, correction, 0.00010703434948458272f);
    const float shifted = std::fma(8388608.f, src - correction, 8388608.f * 127.f);
    const float value = __builtin_bit_cast(float, static_cast<int32_t>(shifted));
    return x < ln_flt_min ? 0.f : (x > ln_flt_max ? INFINITY : value);
}

struct Float32 {
    using T = float;
    static inline float softmax_exp(float v) { return exp_u20(v); }
    static inline float load(float v) { return v; }
    static inline float store(float v) { return v; }
    static inline float round(float v) { return v; }
};

struct BFloat16 {
    using T = uint16_t;
    static inline float softmax_exp(float v) { return fexp_u20(v); }
    static inline float load(uint16_t v) { return bf16_to_float(v); }
    static inline uint16_t store(float v) { return float_to_bf16(v); }
    static inline float round(float v) { return bf16_to_float(float_to_bf16(v)); }
};

// hidden += delta (when given, rounded as a bf16 add), then
// normed = weight * round(hidden * rsqrt(mean(hidden^2) + eps)), as LlamaRMSNorm.
template <class P>
void add_rms_norm(typename P::T* hidden, const typename P::T* delta, const typename P::T* weight, float eps,
                  typename P::T* normed, int rows, int width) {
    std::vector<float> row(width);
    for (int r = 0; r < rows; ++r) {
        typename P::T* h = hidden + static_cast<int64_t>(r) * width;
        float sum_squares = 0.f;
        if (delta != nullptr) {
            const typename P::T* d = delta + static_cast<int64_t>(r) * width;
            for (int i = 0; i < width; ++i) {
                float value = P::round(P::load(h[i]) + P::load(d[i]));
                h[i] = P::store(value);
                row[i] = value;
            }
        } else {
            for (int i = 0; i < width; ++i) row[i] = P::load(h[i]);
        }
#pragma omp simd reduction(+ : sum_squares)
        for (int i = 0; i < width; ++i) sum_squares += row[i] * row[i];
        const float inverse = 1.f / std::sqrt(sum_squares / static_cast<float>(width) + eps);
        typename P::T* out = normed + static_cast<int64_t>(r) * width;
        for (int i = 0; i < width; ++i) out[i] = P::store(P::load(weight[i]) * P::round(row[i] * inverse));
    }
}

// out = round(silu(gate)) * up, rounded: transformers' act_fn(gate_proj(x)) * up_proj(x).
template <class P>
void silu_mul(const typename P::T* gate, int64_t gate_stride, const typename P::T* up, int64_t up_stride,
              typename P::T* out, int rows, int width, int threads) {
    // Rows split over threads once there is enough work (SmolLM2, 16 x 1,536: 37 us on
    // one thread); a few thousand elements are done before a second thread would wake.
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows > 1 && rows * width >= 8192)
    for (int r = 0; r < rows; ++r) {
        const typename P::T* g = gate + r * gate_stride;
        const typename P::T* u = up + r * up_stride;
        typename P::T* o = out + static_cast<int64_t>(r) * width;
#pragma omp simd
        for (int i = 0; i < width; ++i) {
            const float x = P::load(g[i]);
            o[i] = P::store(P::round(x / (1.f + fast_exp(-x))) * P::load(u[i]));
        }
    }
}

// round(round(x * cos) + round(roll(x, D/2) * sin_signed)): the rotary embedding as
// transformers applies it, x * cos + rotate_half(x) * sin, one head.
// Scores (length) -> unnormalised softmax weights in place, rounded as the flash kernel
// rounds them; returns 1 / their float32 sum (0 when every position is masked: the
// output is then 0, as PyTorch's).
template <class P>
inline float softmax_weights(float* s, int length) {
    float top = -INFINITY;
    for (int j = 0; j < length; ++j) top = s[j] > top ? s[j] : top;
    if (top == -INFINITY) top = 0.f;  // every position masked: all weights 0
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int j = 0; j < length; ++j) {
        const float e = P::softmax_exp(s[j] - top);
        total += e;
        s[j] = P::round(e);  // as the flash kernel feeds bf16 weights to its second matmul
    }
    return total > 0.f ? 1.f / total : 0.f;
}

template <class P>
inline void rotate_head(const typename P::T* x, const typename P::T* cos, const typename P::T* sin_signed, int dim,
                        float* out) {
    const int half = dim / 2;
    // roll(x, D/2)[i] is x[i + D/2] in the first half and x[i - D/2] in the second:
    // two loops without a modulo, so that both vectorise.
    for (int i = 0; i < half; ++i)
        out[i] = P::round(P::round(P::load(x[i]) * P::load(cos[i])) +
                          P::round(P::load(x[i + half]) * P::load(sin_signed[i])));
    for (int i = half; i < dim; ++i)
        out[i] = P::round(P::round(P::load(x[i]) * P::load(cos[i])) +
                          P::round(P::load(x[i - half]) * P::load(sin_signed[i])));
}

#if defined(__AVX512F__)
// 16 floats from float32 or bf16 memory.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}


// fexp_u20 of 16 floats (the same operations, so the same bits).
inline __m512 fexp_u20_16(__m512 x) {
    const __m512 ln_flt_min = _mm512_castsi512_ps(_mm512_set1_epi32(0xc2aeac50));
    const __m512 ln_flt_max = _mm512_castsi512_ps(_mm512_set1_epi32(0x42b17218));
    // The scalar's fmax(fmin(x, max), min): min_ps / max_ps return their second operand
    // when either is NaN, so x goes first to clamp a NaN to max, as fmin does.
    const __m512 src = _mm512_mul_ps(_mm512_max_ps(_mm512_min_ps(x, ln_flt_max), ln_flt_min),
                                     _mm512_castsi512_ps(_mm512_set1_epi32(0x3fb8aa3b)));
    const __m512 fraction = _mm512_sub_ps(src, _mm512_roundscale_ps(src, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    __m512 correction = _mm512_fmadd_ps(fraction, _mm512_set1_ps(-0.079204240219773236f), _mm512_set1_ps(-0.22433836478672356f));
    correction = _mm512_fmadd_ps(fraction, correction, _mm512_set1_ps(0.30354260500649682f));
    correction = _mm512_fmadd_ps(fraction, correction, _mm512_set1_ps(0.00010703434948458272f));
    const __m512 shifted = _mm512_fmadd_ps(_mm512_set1_ps(8388608.f), _mm512_sub_ps(src, correction),
                                           _mm512_set1_ps(8388608.f * 127.f));
    __m512 value = _mm512_castsi512_ps(_mm512_cvttps_epi32(shifted));
    value = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, ln_flt_max, _CMP_GT_OQ), value, _mm512_set1_ps(INFINITY));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, ln_flt_min, _CMP_LT_OQ), value, _mm512_setzero_ps());
}

// float_to_bf16 then back, for 16 floats (integer rounding as the scalar's; a NaN, which
// only a NaN score gives, stays a NaN, if not the scalar's quiet one).
inline __m512 round_to_bf16_16(__m512 v) {
    const __m512i word = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(word, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(word, _mm512_set1_epi32(0x7FFF)), odd);
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// softmax_weights<BFloat16> with 16 scores a vector (the scalar loop does not vectorise:
// std::fmin / fmax are library calls). The same values; the float32 total summed in
// 16 lanes, then across them.
inline float softmax_weights_bf16_16(float* s, int length) {
    __m512 tops = _mm512_set1_ps(-INFINITY);
    int j = 0;
    // Scores first: max_ps returns its second operand for a NaN, so a NaN score is
    // skipped, as the scalar's `s > top ? s : top` skips it.
    for (; j + 16 <= length; j += 16) tops = _mm512_max_ps(_mm512_loadu_ps(s + j), tops);
    const __mmask16 tail = static_cast<__mmask16>((1u << (length - j)) - 1u);
    tops = _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, s + j), tops);
    float top = _mm512_reduce_max_ps(tops);
    if (top == -INFINITY) top = 0.f;  // every position masked: all weights 0
    const __m512 tops_all = _mm512_set1_ps(top);
    __m512 totals = _mm512_setzero_ps();
    for (j = 0; j + 16 <= length; j += 16) {
        const __m512 e = fexp_u20_16(_mm512_sub_ps(_mm512_loadu_ps(s + j), tops_all));
        totals = _mm512_add_ps(totals, e);
        _mm512_storeu_ps(s + j, round_to_bf16_16(e));
    }
    if (tail) {
        const __m512 e = fexp_u20_16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), tops_all));
        totals = _mm512_add_ps(totals, _mm512_maskz_mov_ps(tail, e));
        _mm512_mask_storeu_ps(s + j, tail, round_to_bf16_16(e));
    }
    const float total = _mm512_reduce_add_ps(totals);
    return total > 0.f ? 1.f / total : 0.f;
}

// Scores and weighted value sums of one pair with AVX-512, the head size a multiple of
// 16 known at compile time: each query head's CHUNKS vectors and sums stay in registers,
// and each key and value row is read once for the whole group. Same maths as the
// portable loops below (float32 products and sums, in another order).
template <class P, int CHUNKS>
void attend_avx512(const float* query, const typename P::T* key_cache, const typename P::T* value_cache,
                   const typename P::T* mask_row, typename P::T* out_row, int group, int length, float scale,
                   float* scores) {
    constexpr int DIM = CHUNKS * 16;
    for (int g0 = 0; g0 < group; g0 += 4) {  // up to four query heads at a time in registers
        const int heads = group - g0 < 4 ? group - g0 : 4;
        __m512 q[4][CHUNKS];
        for (int g = 0; g < heads; ++g)
            for (int c = 0; c < CHUNKS; ++c) q[g][c] = _mm512_loadu_ps(query + (g0 + g) * DIM + c * 16);
        for (int l = 0; l < length; ++l) {
            __m512 key[CHUNKS];
            for (int c = 0; c < CHUNKS; ++c) key[c] = load16(key_cache + static_cast<int64_t>(l) * DIM + c * 16);
            const float bias = mask_row == nullptr ? 0.f : P::load(mask_row[l]);
            for (int g = 0; g < heads; ++g) {
                __m512 t = _mm512_mul_ps(q[g][0], key[0]);
                for (int c = 1; c < CHUNKS; ++c) t = _mm512_fmadd_ps(q[g][c], key[c], t);
                scores[(g0 + g) * length + l] = _mm512_reduce_add_ps(t) * scale + bias;
            }
        }
        float inverse[4];
        for (int g = 0; g < heads; ++g) {
            if constexpr (std::is_same_v<P, BFloat16>)
                inverse[g] = softmax_weights_bf16_16(scores + (g0 + g) * length, length);
            else
                inverse[g] = softmax_weights<P>(scores + (g0 + g) * length, length);
        }
        __m512 acc[4][CHUNKS];
        for (int g = 0; g < heads; ++g)
            for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_setzero_ps();
        for (int l = 0; l < length; ++l) {
            __m512 value[CHUNKS];
            for (int c = 0; c < CHUNKS; ++c) value[c] = load16(value_cache + static_cast<int64_t>(l) * DIM + c * 16);
            for (int g = 0; g < heads; ++g) {
                const __m512 p = _mm512_set1_ps(scores[(g0 + g) * length + l]);
                for (int c = 0; c < CHUNKS; ++c) acc[g][c] = _mm512_fmadd_ps(p, value[c], acc[g][c]);
            }
        }
        for (int g = 0; g < heads; ++g) {
            alignas(64) float sums[DIM];
            for (int c = 0; c < CHUNKS; ++c) _mm512_store_ps(sums + c * 16, acc[g][c]);
            typename P::T* o = out_row + (g0 + g) * DIM;
            for (int i = 0; i < DIM; ++i) o[i] = P::store(sums[i] * inverse[g]);
        }
    }
}
#endif

// Attention of one (row, key/value head) pair: rotate the new key, write it and the new
// value at cache position `position`, rotate the group's queries, and attend over
// positions [0, length). DIM > 0 fixes the head size at compile time (the common 64 and
// 128: loops then unroll and the output sums stay in registers); 0 reads it from `dim`.
template <class P, int DIM>
void attend_one_head_group(const typename P::T* q_row, const typename P::T* k_row, const typename P::T* v_row,
                           const typename P::T* cos_row, const typename P::T* sin_row,
                           typename P::T* key_cache, typename P::T* value_cache, const typename P::T* mask_row,
                           typename P::T* out_row, int group, int runtime_dim, int position, int length,
                           float scale) {
    const int dim = DIM > 0 ? DIM : runtime_dim;
    std::vector<float> query(static_cast<size_t>(group) * dim), scores(static_cast<size_t>(group) * length);
    std::vector<float> rotated(dim), sums(dim);
    rotate_head<P>(k_row, cos_row, sin_row, dim, rotated.data());
    for (int i = 0; i < dim; ++i) {
        key_cache[static_cast<int64_t>(position) * dim + i] = P::store(rotated[i]);
        value_cache[static_cast<int64_t>(position) * dim + i] = v_row[i];
    }
    for (int g = 0; g < group; ++g)
        rotate_head<P>(q_row + static_cast<int64_t>(g) * dim, cos_row, sin_row, dim, query.data() + static_cast<size_t>(g) * dim);
#if defined(__AVX512F__)
    if constexpr (DIM > 0 && DIM % 16 == 0) {
        attend_avx512<P, DIM / 16>(query.data(), key_cache, value_cache, mask_row, out_row, group, length, scale,
                                   scores.data());
        return;
    }
#endif

    // Scores: four keys at a time, so that four independent sums run at once (one sum
    // per key is a chain of dependent vector adds, latency-bound).
    int l = 0;
    for (; l + 4 <= length; l += 4) {
        const typename P::T* k0 = key_cache + static_cast<int64_t>(l) * dim;
        const typename P::T* k1 = k0 + dim;
        const typename P::T* k2 = k1 + dim;
        const typename P::T* k3 = k2 + dim;
        for (int g = 0; g < group; ++g) {
            const float* qg = query.data() + static_cast<size_t>(g) * dim;
            float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
            for (int i = 0; i < dim; ++i) {
                d0 += qg[i] * P::load(k0[i]);
                d1 += qg[i] * P::load(k1[i]);
                d2 += qg[i] * P::load(k2[i]);
                d3 += qg[i] * P::load(k3[i]);
            }
            float* s = scores.data() + static_cast<size_t>(g) * length + l;
            s[0] = d0 * scale;
            s[1] = d1 * scale;
            s[2] = d2 * scale;
            s[3] = d3 * scale;
        }
    }
    for (; l < length; ++l) {
        const typename P::T* key = key_cache + static_cast<int64_t>(l) * dim;
        for (int g = 0; g < group; ++g) {
            const float* qg = query.data() + static_cast<size_t>(g) * dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < dim; ++i) dot += qg[i] * P::load(key[i]);
            scores[static_cast<size_t>(g) * length + l] = dot * scale;
        }
    }

    for (int g = 0; g < group; ++g) {
        // Softmax, then the probability-weighted sum of the values, normalised once at the end.
        float* s = scores.data() + static_cast<size_t>(g) * length;
        if (mask_row != nullptr)
            for (int j = 0; j < length; ++j) s[j] += P::load(mask_row[j]);
        const float inverse = softmax_weights<P>(s, length);
        float* acc = sums.data();
        for (int i = 0; i < dim; ++i) acc[i] = 0.f;
        for (int j = 0; j < length; ++j) {
            const float p = s[j];
            const typename P::T* value = value_cache + static_cast<int64_t>(j) * dim;
#pragma omp simd
            for (int i = 0; i < dim; ++i) acc[i] += p * P::load(value[i]);
        }
        typename P::T* o = out_row + static_cast<int64_t>(g) * dim;
        for (int i = 0; i < dim; ++i) o[i] = P::store(acc[i] * inverse);
    }
}

// One decode step of attention for every row: the (row, key/value head) pairs split
// over `threads` threads of PyTorch's own OpenMP pool (the library links the same
// libgomp, so no second pool competes for the cores). Query head h reads key/value
// head h / (heads / kv_heads), as transformers' repeat_kv does.
template <class P>
void rope_attention(const typename P::T* q, int64_t q_stride, const typename P::T* k, int64_t k_stride,
                    const typename P::T* v, int64_t v_stride, const typename P::T* cos,
                    const typename P::T* sin_signed, typename P::T* keys, typename P::T* values,
                    const typename P::T* mask, int64_t mask_stride, typename P::T* out, int batch, int heads,
                    int kv_heads, int dim, int capacity, int position, int length, float scale, int threads) {
    const int group = heads / kv_heads;
    const int pairs = batch * kv_heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int pair = 0; pair < pairs; ++pair) {
        const int b = pair / kv_heads, kv = pair % kv_heads;
        const int64_t cache_offset = static_cast<int64_t>(pair) * capacity * dim;
        const auto* q_row = q + b * q_stride + static_cast<int64_t>(kv) * group * dim;
        const auto* k_row = k + b * k_stride + static_cast<int64_t>(kv) * dim;
        const auto* v_row = v + b * v_stride + static_cast<int64_t>(kv) * dim;
        const auto* cos_row = cos + static_cast<int64_t>(b) * dim;
        const auto* sin_row = sin_signed + static_cast<int64_t>(b) * dim;
        const auto* mask_row = mask == nullptr ? nullptr : mask + b * mask_stride;
        auto* out_row = out + (static_cast<int64_t>(b) * heads + static_cast<int64_t>(kv) * group) * dim;
        if (dim == 64)
            attend_one_head_group<P, 64>(q_row, k_row, v_row, cos_row, sin_row, keys + cache_offset,
                                         values + cache_offset, mask_row, out_row, group, dim, position, length, scale);
        else if (dim == 128)
            attend_one_head_group<P, 128>(q_row, k_row, v_row, cos_row, sin_row, keys + cache_offset,
                                          values + cache_offset, mask_row, out_row, group, dim, position, length, scale);
        else
            attend_one_head_group<P, 0>(q_row, k_row, v_row, cos_row, sin_row, keys + cache_offset,
                                        values + cache_offset, mask_row, out_row, group, dim, position, length, scale);
    }
}


#if defined(UCAI_TILES)
// ---------------------------------------------------------------- bf16 tile matmul
// A decode step's projections are matmuls of a few rows (one per sequence) against
// weights streamed from memory once a step. oneDNN's packed bf16 matmul reaches ~12 GB/s
// of the ~25 GB/s a plain read streams on two cores of a Sapphire Rapids CPU at 16 rows
// (`benchmarks/generation.py` measures both); these AMX loops, one 16-row tile of the
// input against four 16-column weight tiles per 32-wide slice of K, reach ~20 GB/s.
// They accumulate each output in float32 over K in slices of 32, in order, as oneDNN's
// AMX kernels do for up to 32 rows: the outputs are bit-identical there (the caller
// checks that on its real input and otherwise keeps oneDNN).
//
// Packed weight layout for W (N, K) row-major, N % 16 == 0 and K % 32 == 0:
//   [N / 16 column blocks][K / 32 slices][16 pairs of K][16 columns][2]
// so that each (block, slice) is one 1 KiB tile in the VNNI layout TDPBF16PS reads.

struct TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t columns_bytes[16];
    uint8_t rows[16];
};

// Tiles 0-3: four 16-column output blocks (float32); 4: the input rows; 5-7: weights.
inline void configure_tiles(int rows) {
    TileConfig config;
    std::memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int tile = 0; tile < 5; ++tile) {
        config.rows[tile] = static_cast<uint8_t>(rows);
        config.columns_bytes[tile] = 64;
    }
    for (int tile = 5; tile < 8; ++tile) {
        config.rows[tile] = 16;
        config.columns_bytes[tile] = 64;
    }
    _tile_loadconfig(&config);
}

inline void store_block(int tile, float* block) {
    switch (tile) {  // tile numbers are immediates
        case 0: _tile_stored(0, block, 64); break;
        case 1: _tile_stored(1, block, 64); break;
        case 2: _tile_stored(2, block, 64); break;
        default: _tile_stored(3, block, 64);
    }
}
#endif

}  // namespace

#define UCAI_EXPORT_ALL(SUFFIX, POLICY)                                                                             \
    extern "C" void ucai_add_rms_norm_##SUFFIX(void* hidden, const void* delta, const void* weight, float eps,     \
                                               void* normed, int rows, int width) {                                \
        using T = POLICY::T;                                                                                       \
        add_rms_norm<POLICY>(static_cast<T*>(hidden), static_cast<const T*>(delta), static_cast<const T*>(weight), \
                             eps, static_cast<T*>(normed), rows, width);                                           \
    }                                                                                                              \
    extern "C" void ucai_silu_mul_##SUFFIX(const void* gate, int64_t gate_stride, const void* up,                  \
                                           int64_t up_stride, void* out, int rows, int width, int threads) {       \
        using T = POLICY::T;                                                                                       \
        silu_mul<POLICY>(static_cast<const T*>(gate), gate_stride, static_cast<const T*>(up), up_stride,           \
                         static_cast<T*>(out), rows, width, threads);                                              \
    }                                                                                                              \
    extern "C" void ucai_rope_attention_##SUFFIX(                                                                  \
        const void* q, int64_t q_stride, const void* k, int64_t k_stride, const void* v, int64_t v_stride,        \
        const void* cos, const void* sin_signed, void* keys, void* values, const void* mask, int64_t mask_stride, \
        void* out, int batch, int heads, int kv_heads, int dim, int capacity, int position, int length,           \
        float scale, int threads) {                                                                                             \
        using T = POLICY::T;                                                                                       \
        rope_attention<POLICY>(static_cast<const T*>(q), q_stride, static_cast<const T*>(k), k_stride,             \
                               static_cast<const T*>(v), v_stride, static_cast<const T*>(cos),                     \
                               static_cast<const T*>(sin_signed), static_cast<T*>(keys), static_cast<T*>(values), \
                               static_cast<const T*>(mask), mask_stride, static_cast<T*>(out), batch, heads,       \
                               kv_heads, dim, capacity, position, length, scale, threads);                         \
    }

UCAI_EXPORT_ALL(f32, Float32)
UCAI_EXPORT_ALL(bf16, BFloat16)

// Tile matmul entry points: 1 where this build has them (compiled for a CPU with AMX
// bf16); `ucai_tiles_request` asks Linux for the tile state (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) and returns 0 once granted.
extern "C" int ucai_tiles_built() {
#if defined(UCAI_TILES)
    return 1;
#else
    return 0;
#endif
}

extern "C" int ucai_tiles_request() {
#if defined(UCAI_TILES)
    return static_cast<int>(syscall(SYS_arch_prctl, 0x1023, 18));
#else
    return -1;
#endif
}

// weight: (N, K) bf16 row-major -> packed (N * K), the layout above.
extern "C" void ucai_tiles_pack_bf16(const void* weight, int n, int k, void* packed) {
    const auto* w = static_cast<const uint16_t*>(weight);
    auto* out = static_cast<uint16_t*>(packed);
    const int slices = k / 32;
    for (int block = 0; block < n / 16; ++block)
        for (int slice = 0; slice < slices; ++slice) {
            uint16_t* tile = out + (static_cast<int64_t>(block) * slices + slice) * 512;
            for (int column = 0; column < 16; ++column) {
                const uint16_t* row = w + static_cast<int64_t>(block * 16 + column) * k + slice * 32;
                for (int pair = 0; pair < 16; ++pair) {
                    tile[pair * 32 + column * 2] = row[pair * 2];
                    tile[pair * 32 + column * 2 + 1] = row[pair * 2 + 1];
                }
            }
        }
}

// out (M, N) = x (M, K) @ W.T in bf16 (float32 sums, rounded once), W packed above.
// x rows and out rows contiguous with the given row strides. The column blocks split
// over `threads` threads of PyTorch's OpenMP pool; each thread configures its own tiles
// and releases them at the end of the call (oneDNN configures its own at the start of
// each of its executions, so the two never run on each other's configuration).
extern "C" void ucai_tiles_linear_bf16(const void* input, int64_t x_stride, int m, int k, const void* packed, int n,
                                       void* output, int64_t out_stride, int threads) {
#if defined(UCAI_TILES)
    const auto* x = static_cast<const uint16_t*>(input);
    const auto* weights = static_cast<const uint16_t*>(packed);
    auto* out = static_cast<uint16_t*>(output);
    const int slices = k / 32, blocks = n / 16;
    const int64_t block_size = static_cast<int64_t>(slices) * 512;
    const int64_t x_bytes = x_stride * 2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        // Each thread takes an equal run of column blocks (SmolLM2's 576-wide
        // projections have 36: 18 each, where groups of four would split 20 / 16).
        const int team = omp_get_num_threads(), member = omp_get_thread_num();
        const int begin = blocks * member / team, end = blocks * (member + 1) / team;
        int configured_rows = -1;
        alignas(64) float block[16 * 16];
        for (int first = begin; first < end; first += 4) {
            const int count = std::min(4, end - first);
            const uint16_t* w = weights + first * block_size;
            for (int m0 = 0; m0 < m; m0 += 16) {
                const int rows = std::min(16, m - m0);
                if (rows != configured_rows) configure_tiles(configured_rows = rows);
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                const uint16_t* a = x + m0 * x_stride;
                if (count == 4) {
                    for (int slice = 0; slice < slices; ++slice) {
                        const int64_t at = static_cast<int64_t>(slice) * 512;
                        _tile_loadd(4, a + slice * 32, x_bytes);
                        _tile_loadd(5, w + at, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        _tile_loadd(6, w + block_size + at, 64);
                        _tile_dpbf16ps(1, 4, 6);
                        _tile_loadd(7, w + 2 * block_size + at, 64);
                        _tile_dpbf16ps(2, 4, 7);
                        _tile_loadd(5, w + 3 * block_size + at, 64);
                        _tile_dpbf16ps(3, 4, 5);
                    }
                } else {
                    for (int slice = 0; slice < slices; ++slice) {
                        const int64_t at = static_cast<int64_t>(slice) * 512;
                        _tile_loadd(4, a + slice * 32, x_bytes);
                        _tile_loadd(5, w + at, 64);
                        _tile_dpbf16ps(0, 4, 5);
                        if (count > 1) {
                            _tile_loadd(6, w + block_size + at, 64);
                            _tile_dpbf16ps(1, 4, 6);
                        }
                        if (count > 2) {
                            _tile_loadd(7, w + 2 * block_size + at, 64);
                            _tile_dpbf16ps(2, 4, 7);
                        }
                    }
                }
                for (int j = 0; j < count; ++j) {
                    store_block(j, block);
                    for (int r = 0; r < rows; ++r) {
                        uint16_t* o = out + (m0 + r) * out_stride + (first + j) * 16;
                        for (int c = 0; c < 16; ++c) o[c] = float_to_bf16(block[r * 16 + c]);
                    }
                }
            }
        }
        _tile_release();
    }
#else
    (void)input, (void)x_stride, (void)m, (void)k, (void)packed, (void)n, (void)output, (void)out_stride, (void)threads;
#endif
}
