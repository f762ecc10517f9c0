/* Fused element-wise loops of the delta-space merges (lorakit.ops._native loads this; see its docstring).
 *
 * Each function does, in one pass over a tile held in cache, what lorakit.ops._kernels does in a dozen torch
 * passes, with the same IEEE operations in the same order, so both give the same values (tested):
 * compile without -ffast-math and with -ffp-contract=off (no fused multiply-adds). */
#include <math.h>
#include <stdint.h>

/* Counting pass of kth_largest_abs_bracketed for one task: returns how many |x| lie in [lo, hi) and writes
 * them (in order) to out; *n_lo gets the number of |x| >= lo. With AVX-512, 16 entries at a time and the
 * bracket's values compress-stored (the scalar loop's store index is a loop-carried dependency that keeps it
 * from vectorising); the scalar loop does the rest, and is the whole loop elsewhere. Same counts
 * and values in the same order either way (comparisons are exact; NaN counts as neither). */
#ifdef __AVX512F__
#include <immintrin.h>
#endif

int64_t lk_bracket_f32(const float *x, int64_t len, float lo, float hi, float *out, int64_t *n_lo) {
    int64_t k = 0, c = 0, e = 0;
#ifdef __AVX512F__
    const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
    for (; e + 16 <= len; e += 16) {
        __m512 a = _mm512_castsi512_ps(_mm512_and_si512(_mm512_loadu_si512((const void *)(x + e)), absmask));
        __mmask16 ge = _mm512_cmp_ps_mask(a, vlo, _CMP_GE_OQ);
        __mmask16 in = ge & _mm512_cmp_ps_mask(a, vhi, _CMP_LT_OQ);
        c += __builtin_popcount((unsigned)ge);
        /* compress in a register, then a full store: the compressing store is microcoded on Zen 4 (slow);
         * the 16 lanes at out + k fit, as k <= e and out holds len values */
        _mm512_storeu_ps(out + k, _mm512_maskz_compress_ps(in, a));
        k += __builtin_popcount((unsigned)in);
    }
#endif
    for (; e < len; e++) {
        float a = fabsf(x[e]);
        int ge = a >= lo;
        c += ge;
        out[k] = a;
        k += ge & (a < hi);
    }
    *n_lo = c;
    return k;
}

/* Prune (trim to [lo, hi), or multiply by a 0/1 mask) and merge n task tiles of len entries each
 * (task i at x + i*xs; its mask at m + i*ms).
 *   mode 0: no prune; mode 1: keep |x| >= lo_i; mode 2: keep lo_i <= |x| < hi_i; mode 3: multiply by mask.
 *   signed == 0: out = sum of the pruned values in task order.
 *   signed == 1: TIES election and disjoint mean: P / Nn the positive / negative masses (task order), p / q
 *     their counts; sigma = sign(P + Nn); out = P/p (sigma > 0), Nn/q (sigma < 0), 0 when every entry is 0;
 *     at a sign tie (P + Nn == 0, some entry nonzero) out = P/p, and the entry's index, P and q go to ties,
 *     tie_p and tie_q (the negative mean is -P/q: Nn == -P exactly there).
 * Returns the number of ties written; *sigma_sum gets the sum of sigma over the tile. */
#define BLOCK 512

/* One task's pruned values of a block, v[e] for e < len (mode as in lk_merge_f32). Loops stay branch-free and
 * the mode test outside them, so the compiler vectorises each. */
static void pruned(const float *x, int64_t len, int mode, float lo, float hi, const float *m, float *v) {
    if (mode == 1) {
        for (int64_t e = 0; e < len; e++) v[e] = x[e] * (float)(fabsf(x[e]) >= lo);
    } else if (mode == 2) {
        for (int64_t e = 0; e < len; e++) {
            float a = fabsf(x[e]);
            v[e] = (x[e] * (float)(a < hi)) * (float)(a >= lo);
        }
    } else if (mode == 3) {
        for (int64_t e = 0; e < len; e++) v[e] = x[e] * m[e];
    } else {
        for (int64_t e = 0; e < len; e++) v[e] = x[e];
    }
}

int64_t lk_merge_f32(const float *x, int64_t n, int64_t xs, int64_t len, int mode, const float *lo,
                     const float *hi, const float *m, int64_t ms, int sgn, float *out, int64_t *ties,
                     float *tie_p, float *tie_q, double *sigma_sum) {
    int64_t n_tie = 0, sig_total = 0;
    float v[BLOCK], P[BLOCK], N[BLOCK], p[BLOCK], q[BLOCK];
    for (int64_t b0 = 0; b0 < len; b0 += BLOCK) {
        int64_t bl = len - b0 < BLOCK ? len - b0 : BLOCK;
        float *o = out + b0;
        for (int64_t i = 0; i < n; i++) {
            pruned(x + i * xs + b0, bl, mode, lo ? lo[i] : 0.0f, hi ? hi[i] : 0.0f, m ? m + i * ms + b0 : 0, v);
            if (!sgn) {
                if (i == 0) for (int64_t e = 0; e < bl; e++) o[e] = v[e];
                else for (int64_t e = 0; e < bl; e++) o[e] = o[e] + v[e];
                continue;
            }
            if (i == 0) {
                for (int64_t e = 0; e < bl; e++) {
                    float pos = v[e] > 0.0f, neg = v[e] < 0.0f;
                    P[e] = v[e] * pos; N[e] = v[e] * neg; p[e] = pos; q[e] = neg;
                }
            } else {
                for (int64_t e = 0; e < bl; e++) {
                    float pos = v[e] > 0.0f, neg = v[e] < 0.0f;
                    P[e] = P[e] + v[e] * pos; N[e] = N[e] + v[e] * neg; p[e] = p[e] + pos; q[e] = q[e] + neg;
                }
            }
        }
        if (!sgn) continue;
        int64_t any_tie = 0;
        for (int64_t e = 0; e < bl; e++) {
            float s = P[e] + N[e];
            float gt = s > 0.0f, lt = s < 0.0f;
            float num = P[e] * gt + N[e] * lt, den = p[e] * gt + q[e] * lt;
            o[e] = num / (den < 1.0f ? 1.0f : den);
            sig_total += (int64_t)gt - (int64_t)lt;
            any_tie |= (s == 0.0f) & (p[e] + q[e] > 0.0f);
        }
        if (any_tie) {
            for (int64_t e = 0; e < bl; e++) {
                if (P[e] + N[e] == 0.0f && p[e] + q[e] > 0.0f) {
                    o[e] = P[e] / (p[e] < 1.0f ? 1.0f : p[e]);
                    tie_p[n_tie] = P[e];
                    tie_q[n_tie] = q[e];
                    ties[n_tie++] = b0 + e;
                }
            }
        }
    }
    *sigma_sum = (double)sig_total;
    return n_tie;
}

/* DELLA's MAGPRUNE on one task tile of rows x cols (row-major), in place: per row, the rank of each |x| (0 =
 * smallest; equal magnitudes ranked by column, a stable order), p = rank*c1 + c2 (two float operations, as the
 * torch path's mul_ and add_), x = u < p ? x/p : 0. The ranks come from a stable LSD radix sort of the
 * magnitudes' bit patterns (as unsigned integers they sort like the magnitudes; NaN last), 11 + 11 + 10 bits:
 * three counting passes over a row held in cache, instead of a comparison sort. work holds 4*cols words. */
void lk_della_f32(float *x, const float *u, int64_t rows, int64_t cols, float c1, float c2, uint32_t *work) {
    uint32_t *k0 = work, *i0 = work + cols, *k1 = work + 2 * cols, *i1 = work + 3 * cols;
    static const int SHIFT[3] = {0, 11, 22};
    for (int64_t r = 0; r < rows; r++) {
        float *xr = x + r * cols;
        const float *ur = u + r * cols;
        const uint32_t *bits = (const uint32_t *)xr;
        uint32_t h[3][2048] = {{0}};
        for (int64_t e = 0; e < cols; e++) {
            uint32_t key = bits[e] & 0x7fffffffu;
            h[0][key & 2047u]++;
            h[1][(key >> 11) & 2047u]++;
            h[2][key >> 22]++;
        }
        for (int d = 0; d < 3; d++) {  /* exclusive prefix sums: each digit's first position */
            uint32_t total = 0;
            for (int b = 0; b < 2048; b++) {
                uint32_t c = h[d][b];
                h[d][b] = total;
                total += c;
            }
        }
        for (int64_t e = 0; e < cols; e++) {
            uint32_t key = bits[e] & 0x7fffffffu, at = h[0][key & 2047u]++;
            k1[at] = key;
            i1[at] = (uint32_t)e;
        }
        for (int64_t j = 0; j < cols; j++) {
            uint32_t key = k1[j], at = h[1][(key >> SHIFT[1]) & 2047u]++;
            k0[at] = key;
            i0[at] = i1[j];
        }
        /* the last pass places each column's rank at the column (k1 reused), then one sequential loop */
        for (int64_t j = 0; j < cols; j++) k1[i0[j]] = h[2][k0[j] >> SHIFT[2]]++;
        for (int64_t e = 0; e < cols; e++) {
            float p = (float)k1[e] * c1;
            p = p + c2;
            float v = xr[e];
            xr[e] = ur[e] < p ? v / p : 0.0f;
        }
    }
}
