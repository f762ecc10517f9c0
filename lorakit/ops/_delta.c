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
 * three counting passes over a row held in cache, instead of a comparison sort (a bucket sort with insertion
 * sorts inside measured twice as slow: its branches). work holds 5*cols words. */
void lk_della_f32(float *x, const float *u, int64_t rows, int64_t cols, float c1, float c2, uint32_t *work) {
    /* (key << 32 | column) pairs: one 8-byte move per entry and pass */
    uint64_t *a = (uint64_t *)work, *b = (uint64_t *)work + cols;
    uint32_t *rank = work + 4 * cols;
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
            for (int q = 0; q < 2048; q++) {
                uint32_t c = h[d][q];
                h[d][q] = total;
                total += c;
            }
        }
        for (int64_t e = 0; e < cols; e++) {
            uint32_t key = bits[e] & 0x7fffffffu;
            b[h[0][key & 2047u]++] = ((uint64_t)key << 32) | (uint64_t)e;
        }
        for (int64_t j = 0; j < cols; j++) {
            uint64_t v = b[j];
            a[h[1][(v >> 43) & 2047u]++] = v;
        }
        for (int64_t j = 0; j < cols; j++) {
            uint64_t v = a[j];
            rank[(uint32_t)v] = h[2][v >> 54]++;
        }
        for (int64_t e = 0; e < cols; e++) {
            float p = (float)rank[e] * c1;
            p = p + c2;
            float v = xr[e];
            xr[e] = ur[e] < p ? v / p : 0.0f;
        }
    }
}

/* Skinny products of the randomized SVD, Y = M Z and Bt = Mᵀ Q, for a row-major float32 M (rows x cols, row
 * stride ldm) and k <= a few dozen columns: MKL takes 1.0-1.8 ns an entry of M for k = 26 on Zen 4 (its
 * AVX2 path), these 0.6 (about 85% of the FMA peak). Z and Q come padded to a multiple of 32 columns (zeros
 * beyond k), so every vector load is whole. Fused multiply-adds, in an order fixed by the shapes alone: each
 * output entry gets the same operations whatever part of the rows (mm) or columns (mtm) one call covers, so
 * splitting a product over threads that way gives the same bits. Sums run in chunks (SUM_CHUNK terms) that
 * are then added, which keeps the rounding near a blocked BLAS's. lk_products() says whether they exist. */
#define SUM_CHUNK 512
int lk_products(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}

#ifdef __AVX512F__
#define MM_ROWS 8
/* Y[r, 0:kk] for MM_ROWS (or rb < MM_ROWS) rows: broadcast M[r, c], multiply-add into two 16-lane
 * accumulators per row with Z[c, 0:32]. */
static inline __attribute__((always_inline)) void mm_rows(const float *M, int64_t ldm, int64_t cols,
        const float *Z, int64_t zs, float *Y, int64_t ys, int rb, __mmask16 m0, __mmask16 m1) {
    __m512 a0[MM_ROWS], a1[MM_ROWS];
    for (int64_t c0 = 0; c0 < cols; c0 += SUM_CHUNK) {
        int64_t c1 = cols - c0 < SUM_CHUNK ? cols : c0 + SUM_CHUNK;
        for (int j = 0; j < MM_ROWS; j++) a0[j] = a1[j] = _mm512_setzero_ps();
        for (int64_t c = c0; c < c1; c++) {
            __m512 z0 = _mm512_loadu_ps(Z + c * zs), z1 = _mm512_loadu_ps(Z + c * zs + 16);
            for (int j = 0; j < MM_ROWS; j++) {
                if (j < rb) {
                    __m512 b = _mm512_set1_ps(M[j * ldm + c]);
                    a0[j] = _mm512_fmadd_ps(b, z0, a0[j]);
                    a1[j] = _mm512_fmadd_ps(b, z1, a1[j]);
                }
            }
        }
        for (int j = 0; j < MM_ROWS; j++) {  /* the chunk's sums join the running total in Y */
            if (j < rb) {
                if (c0) {
                    a0[j] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, Y + j * ys), a0[j]);
                    a1[j] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, Y + j * ys + 16), a1[j]);
                }
                _mm512_mask_storeu_ps(Y + j * ys, m0, a0[j]);
                _mm512_mask_storeu_ps(Y + j * ys + 16, m1, a1[j]);
            }
        }
    }
}
#endif

/* Y (rows x k, row stride ys) = M Z, Z cols x zs (zs a multiple of 32 >= k). */
void lk_mm_f32(const float *M, int64_t rows, int64_t cols, int64_t ldm, const float *Z, int64_t zs, int64_t k,
               float *Y, int64_t ys) {
#ifdef __AVX512F__
    for (int64_t j0 = 0; j0 < k; j0 += 32) {
        int64_t kk = k - j0 < 32 ? k - j0 : 32;
        __mmask16 m0 = kk >= 16 ? 0xffff : (__mmask16)((1u << kk) - 1);
        __mmask16 m1 = kk >= 32 ? 0xffff : kk > 16 ? (__mmask16)((1u << (kk - 16)) - 1) : 0;
        int64_t r = 0;
        for (; r + MM_ROWS <= rows; r += MM_ROWS)
            mm_rows(M + r * ldm, ldm, cols, Z + j0, zs, Y + r * ys + j0, ys, MM_ROWS, m0, m1);
        if (r < rows) mm_rows(M + r * ldm, ldm, cols, Z + j0, zs, Y + r * ys + j0, ys, (int)(rows - r), m0, m1);
    }
#else
    (void)M; (void)rows; (void)cols; (void)ldm; (void)Z; (void)zs; (void)k; (void)Y; (void)ys;
#endif
}

#ifdef __AVX512F__
#define MTM_ROWS 8
#define MTM_COLS 4
/* S[c, 0:32] += sum over tr (<= MTM_ROWS) rows of M[r, c] Q[r, 0:32], for the columns c < cols: the rows of
 * Q stay in registers, the columns go MTM_COLS at a time (independent accumulator chains). */
static inline __attribute__((always_inline)) void mtm_rows(const float *M, int64_t ldm, int64_t cols, int tr,
        const float *Q, int64_t qs, float *S) {
    __m512 q0[MTM_ROWS], q1[MTM_ROWS];
    for (int i = 0; i < MTM_ROWS; i++) {
        q0[i] = i < tr ? _mm512_loadu_ps(Q + i * qs) : _mm512_setzero_ps();
        q1[i] = i < tr ? _mm512_loadu_ps(Q + i * qs + 16) : _mm512_setzero_ps();
    }
    int64_t c = 0;
    for (; c + MTM_COLS <= cols; c += MTM_COLS) {
        __m512 a0[MTM_COLS], a1[MTM_COLS];
        for (int u = 0; u < MTM_COLS; u++) {
            a0[u] = _mm512_loadu_ps(S + (c + u) * 32);
            a1[u] = _mm512_loadu_ps(S + (c + u) * 32 + 16);
        }
        for (int i = 0; i < MTM_ROWS; i++) {
            if (i < tr) {
                for (int u = 0; u < MTM_COLS; u++) {
                    __m512 b = _mm512_set1_ps(M[i * ldm + c + u]);
                    a0[u] = _mm512_fmadd_ps(b, q0[i], a0[u]);
                    a1[u] = _mm512_fmadd_ps(b, q1[i], a1[u]);
                }
            }
        }
        for (int u = 0; u < MTM_COLS; u++) {
            _mm512_storeu_ps(S + (c + u) * 32, a0[u]);
            _mm512_storeu_ps(S + (c + u) * 32 + 16, a1[u]);
        }
    }
    for (; c < cols; c++) {  /* the same operations per column as above */
        __m512 a0 = _mm512_loadu_ps(S + c * 32), a1 = _mm512_loadu_ps(S + c * 32 + 16);
        for (int i = 0; i < MTM_ROWS; i++) {
            if (i < tr) {
                __m512 b = _mm512_set1_ps(M[i * ldm + c]);
                a0 = _mm512_fmadd_ps(b, q0[i], a0);
                a1 = _mm512_fmadd_ps(b, q1[i], a1);
            }
        }
        _mm512_storeu_ps(S + c * 32, a0);
        _mm512_storeu_ps(S + c * 32 + 16, a1);
    }
}
#endif

/* Bt (cols x k, row stride bs) = Mᵀ Q, Q rows x qs (qs a multiple of 32 >= k); work holds 64*cols floats. */
void lk_mtm_f32(const float *M, int64_t rows, int64_t cols, int64_t ldm, const float *Q, int64_t qs, int64_t k,
                float *Bt, int64_t bs, float *work) {
#ifdef __AVX512F__
    float *S = work, *T = work + 32 * cols;  /* a chunk's partial sums, and their total */
    for (int64_t j0 = 0; j0 < k; j0 += 32) {
        int64_t kk = k - j0 < 32 ? k - j0 : 32;
        for (int64_t e = 0; e < 32 * cols; e++) T[e] = 0.0f;
        for (int64_t r0 = 0; r0 < rows; r0 += SUM_CHUNK) {
            int64_t r1 = rows - r0 < SUM_CHUNK ? rows : r0 + SUM_CHUNK;
            for (int64_t e = 0; e < 32 * cols; e++) S[e] = 0.0f;
            int64_t r = r0;
            for (; r + MTM_ROWS <= r1; r += MTM_ROWS) mtm_rows(M + r * ldm, ldm, cols, MTM_ROWS, Q + r * qs + j0, qs, S);
            if (r < r1) mtm_rows(M + r * ldm, ldm, cols, (int)(r1 - r), Q + r * qs + j0, qs, S);
            for (int64_t e = 0; e < 32 * cols; e++) T[e] = T[e] + S[e];
        }
        for (int64_t c = 0; c < cols; c++)
            for (int64_t j = 0; j < kk; j++) Bt[c * bs + j0 + j] = T[c * 32 + j];
    }
#else
    (void)M; (void)rows; (void)cols; (void)ldm; (void)Q; (void)qs; (void)k; (void)Bt; (void)bs; (void)work;
#endif
}

/* The uniforms of torch.rand(n, generator=torch.Generator().manual_seed(seed)) for float32 on the CPU, the
 * documented random stream of DARE and DELLA, 10-20x faster than torch draws them (5 ns a value: one locked,
 * indirect call per value). torch's generator is MT19937 seeded by init_genrand (seed & 0xffffffff), and a
 * float32 uniform is (next32() & (2^24 - 1)) * 2^-24. Here the whole 624-word state is regenerated at once
 * (loops the compiler vectorises: each reads words at least 227 away from the ones it writes) and tempered
 * in blocks. lorakit.ops._native checks these against torch.rand before it uses them. */
#define MT_N 624
#define MT_M 397
static void mt_seed(uint32_t *s, uint32_t seed) {
    s[0] = seed;
    for (uint32_t j = 1; j < MT_N; j++) s[j] = 1812433253u * (s[j - 1] ^ (s[j - 1] >> 30)) + j;
}

static inline uint32_t mt_twist(uint32_t u, uint32_t v) {
    return (((u & 0x80000000u) | (v & 0x7fffffffu)) >> 1) ^ ((v & 1u) ? 0x9908b0dfu : 0u);
}

static void mt_next(uint32_t *s, uint32_t *t) {  /* regenerate the state, and the tempered outputs into t */
    int i = 0;
    for (; i < MT_N - MT_M; i++) s[i] = s[i + MT_M] ^ mt_twist(s[i], s[i + 1]);
    for (; i < MT_N - 1; i++) s[i] = s[i + MT_M - MT_N] ^ mt_twist(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ mt_twist(s[MT_N - 1], s[0]);
    for (i = 0; i < MT_N; i++) {
        uint32_t y = s[i];
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c5680u;
        y ^= (y << 15) & 0xefc60000u;
        y ^= y >> 18;
        t[i] = y;
    }
}

/* out[e] = the e-th uniform (keep < 0), or 1.0f where it is < keep and 0.0f elsewhere (DARE's mask) */
void lk_uniform_f32(uint32_t seed, int64_t n, float keep, float *out) {
    uint32_t s[MT_N], t[MT_N];
    mt_seed(s, seed);
    for (int64_t e0 = 0; e0 < n; e0 += MT_N) {
        int64_t len = n - e0 < MT_N ? n - e0 : MT_N;
        mt_next(s, t);
        float *o = out + e0;
        if (keep < 0.0f) {
            for (int64_t e = 0; e < len; e++) o[e] = (float)(t[e] & 0xffffffu) * 0x1p-24f;
        } else {
            for (int64_t e = 0; e < len; e++) o[e] = (float)((float)(t[e] & 0xffffffu) * 0x1p-24f < keep);
        }
    }
}

/* The k-th largest of n floats (1 <= k <= n) by radix selection on their bit patterns, mapped to unsigned
 * integers in the floats' order: a histogram of the top 11 bits finds the digit of the k-th largest, the
 * values with that digit go to work (n words), and the next 11 and last 10 bits settle it among those. Two
 * passes over the n values, against 12 ns a value for torch.kthvalue's selection on 10^6 of them. */
static inline uint32_t order_key(float f) {
    uint32_t b;
    __builtin_memcpy(&b, &f, 4);
    return (b & 0x80000000u) ? ~b : b | 0x80000000u;
}

float lk_kth_largest_f32(const float *v, int64_t n, int64_t k, uint32_t *work) {
    static const int SHIFT[3] = {21, 10, 0};
    static const uint32_t MASK[3] = {2047u, 2047u, 1023u};
    uint32_t prefix = 0, pmask = 0;
    int64_t m = n;  /* candidates: v (pass 0), then work[0:m] */
    for (int d = 0; d < 3; d++) {
        int64_t h[2048] = {0};
        int s = SHIFT[d];
        if (d == 0) for (int64_t e = 0; e < n; e++) h[order_key(v[e]) >> s]++;
        else for (int64_t e = 0; e < m; e++) h[(work[e] >> s) & MASK[d]]++;
        int64_t b = MASK[d];
        for (; b > 0 && h[b] < k; b--) k -= h[b];
        prefix |= (uint32_t)b << s;
        pmask |= MASK[d] << s;
        int64_t j = 0;
        if (d == 0) {
            for (int64_t e = 0; e < n; e++) {
                uint32_t key = order_key(v[e]);
                work[j] = key;
                j += (key & pmask) == prefix;
            }
        } else {
            for (int64_t e = 0; e < m; e++) {
                uint32_t key = work[e];
                work[j] = key;
                j += (key & pmask) == prefix;
            }
        }
        m = j;
    }
    uint32_t b = (prefix & 0x80000000u) ? prefix & 0x7fffffffu : ~prefix;
    float f;
    __builtin_memcpy(&f, &b, 4);
    return f;
}
