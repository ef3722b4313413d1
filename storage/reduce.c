/* Stage one's top-k reduction of teacher logits on a CPU: two passes over each row, the second from cache.
 *
 * Built and loaded by distill/storage/native.py (C99, no dependencies; compiled with -O3 -march=native so that
 * the loops marked `omp simd` vectorise). For each row x of V float32 logits:
 *
 *   pass 1  the maximum of each block of BLOCK columns (and whether any value is NaN); a threshold that at least
 *           k block maxima reach, and the blocks that reach it (narrowed by binning their maxima); the k largest
 *           values among those blocks' columns, which are the row's k largest (any value elsewhere has k block
 *           maxima at least as large above it);
 *   pass 2  e = exp(x - max) once per value, with a vectorised polynomial (relative error about 1e-7); the
 *           sum of each block's e outside the top k (the tail's block sums, which place the tail draws),
 *           the tail's sum, and for each exponent a the sum of e^a over every value (the tempered
 *           normalisers: a = 1/T; a = 1/2 is a square root, any other a a second exp).
 *
 * While pass 2 runs on a row, the next row is prefetched, so that pass 1 finds it in cache.
 *
 * Outputs per row: top values and their ids (in no order), block sums (float32), tail sum and tempered
 * sums (float64). Returns 0, or 1 when a row holds a NaN or +inf, or fewer than k values above -inf: the
 * caller then takes the plain torch path for those logits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32     /* columns per block: distill.storage.labels.BLOCK */
#define MAX_EXPONENTS 8
#define BINS 256     /* pass 1's bins of block maxima */
#define FLUSH 32     /* blocks between moving the float lanes of the tempered sums into float64 */

static inline float exp_poly(float x) {
    /* 2^n p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf polynomial): relative error under 1e-7 down to -87.3,
     * 0 below (and for -inf). r is taken in two fused steps, which -fassociative-math cannot fold into one:
     * folded, it lost 3.7e-6 at x = -72. */
    float xc = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);
    float n = floorf(xc * 1.44269504088896341f + 0.5f);
    float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, xc));
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : p * scale;
}

/* Asks for the next row's block into cache while pass 2 computes on this row's, so that pass 1 finds it there
 * (pass 1 alone waits on memory; pass 2 does not). */
static inline void prefetch_block(const float *y, int64_t len) {
#if defined(__GNUC__)
    for (int64_t j = 0; j < len; j += 64 / (int64_t)sizeof(float)) __builtin_prefetch(y + j, 0, 2);
#else
    (void)y;
    (void)len;
#endif
}

typedef char block_fits_a_32_bit_mask[BLOCK == 32 ? 1 : -1];

static inline int64_t lowest_bit(uint32_t bits) {  /* the index of the lowest set bit (bits != 0) */
#if defined(__GNUC__)
    return __builtin_ctz(bits);
#else
    int64_t j = 0;
    while (!(bits & 1u)) { bits >>= 1; j++; }
    return j;
#endif
}

typedef struct { float value; int64_t id; } item;

/* Moves the k largest of items[0..n) to items[0..k) (in no order) and returns the smallest of them. */
static float select_largest(item *items, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1, target = k - 1;
    while (lo < hi) {
        float pivot = items[lo + (hi - lo) / 2].value;
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (items[i].value > pivot) i++;
            while (items[j].value < pivot) j--;
            if (i <= j) { item t = items[i]; items[i] = items[j]; items[j] = t; i++; j--; }
        }
        if (target <= j) hi = j;
        else if (target >= i) lo = i;
        else break;
    }
    float low = items[0].value;
    for (int64_t a = 1; a < k; a++) low = items[a].value < low ? items[a].value : low;
    return low;
}

static int is_kept(const int64_t *ids, int64_t k, int64_t id) {
    for (int64_t a = 0; a < k; a++)
        if (ids[a] == id) return 1;
    return 0;
}

/* Pass 1's general path (any row): the row's k largest values and their ids (in no order) into top/ids; 0, or 1 for
 * a NaN, +inf or fewer than k values above -inf. `blocks` holds up to 2k candidate blocks: each block whose maximum beats the k-th
 * largest maximum seen so far (`low`), cut back to the k largest whenever it fills. */
static int row_largest_general(const float *x, int64_t v, int64_t k, item *blocks, item *found, float *top, int64_t *ids) {
    int64_t n_blocks = (v + BLOCK - 1) / BLOCK, full = v / BLOCK, n = 0;
    float low = -INFINITY;
    int nan = 0;
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *y = x + b * BLOCK;
        float most = -INFINITY;
        int odd = 0;
        if (b < full) {
            #pragma omp simd reduction(max:most) reduction(|:odd)
            for (int j = 0; j < BLOCK; j++) { most = y[j] > most ? y[j] : most; odd |= (y[j] != y[j]); }
        } else {
            for (int64_t j = 0; j < v - b * BLOCK; j++) { most = y[j] > most ? y[j] : most; odd |= (y[j] != y[j]); }
        }
        nan |= odd;
        if (most > low || n < k) {
            blocks[n].value = most;
            blocks[n].id = b;
            if (++n == 2 * k) { low = select_largest(blocks, n, k); n = k; }
        }
    }
    if (nan || n < k) return 1;
    low = select_largest(blocks, n, k);  /* k values are >= low: only they can be among the top k */
    if (low == -INFINITY) return 1;
    n = 0;
    for (int64_t a = 0; a < k; a++) {
        int64_t b = blocks[a].id, len = b < full ? BLOCK : v - b * BLOCK;
        const float *y = x + b * BLOCK;
        for (int64_t j = 0; j < len; j++)
            if (y[j] >= low) { found[n].value = y[j]; found[n].id = b * BLOCK + j; n++; }
    }
    select_largest(found, n, k);
    for (int64_t a = 0; a < k; a++) {
        if (found[a].value == INFINITY) return 1;
        top[a] = found[a].value;
        ids[a] = found[a].id;
    }
    return 0;
}

/* Pass 1: the row's k largest values and their ids (in no order) into top/ids; 0, or 1 for a NaN, +inf or fewer
 * than k values above -inf. With few data-dependent branches (the general path's running threshold mispredicts
 * a few thousand times a row at k = 64):
 *   - every block's maximum into bm (and whether any value is NaN);
 *   - t0, the smallest of k group maxima (groups of consecutive blocks): at least k blocks reach it, the
 *     candidates;
 *   - where there are more than k + 16, they are counted into BINS bins between t0 and the largest maximum, and only
 *     those in the top bins that hold k or more stay. Binning is monotone in the maximum, so the maximum of every
 *     block left out is below t, the smallest candidate maximum, and at least k values reach t;
 *   - the values at or above t in the candidate blocks (a bit mask per block), and the k largest of them.
 * Rows where this does not narrow the search (masked vocabularies, +inf, many tied maxima) take the general path. */
static int row_largest(const float *x, int64_t v, int64_t k, float *bm, uint16_t *bin, int64_t *cand, item *blocks,
                       item *found, float *top, int64_t *ids) {
    int64_t n_blocks = (v + BLOCK - 1) / BLOCK, full = v / BLOCK;
    int nan = 0;
    for (int64_t b = 0; b < full; b++) {
        const float *y = x + b * BLOCK;
        float most = -INFINITY;
        int odd = 0;
        #pragma omp simd reduction(max:most) reduction(|:odd)
        for (int j = 0; j < BLOCK; j++) { most = y[j] > most ? y[j] : most; odd |= (y[j] != y[j]); }
        bm[b] = most;
        nan |= odd;
    }
    if (full < n_blocks) {
        float most = -INFINITY;
        for (int64_t j = full * BLOCK; j < v; j++) { most = x[j] > most ? x[j] : most; nan |= (x[j] != x[j]); }
        bm[full] = most;
    }
    if (nan) return 1;
    float t0 = INFINITY, hi = -INFINITY;
    for (int64_t g = 0; g < k; g++) {
        float most = -INFINITY;
        for (int64_t b = g * n_blocks / k; b < (g + 1) * n_blocks / k; b++) most = bm[b] > most ? bm[b] : most;
        t0 = most < t0 ? most : t0;
        hi = most > hi ? most : hi;
    }
    if (!(t0 > -INFINITY && hi < INFINITY)) return row_largest_general(x, v, k, blocks, found, top, ids);
    int64_t n = 0;
    for (int64_t b = 0; b < n_blocks; b++) { cand[n] = b; n += bm[b] >= t0; }
    if (n > k + 16) {  /* narrow the candidates down to the top bins holding k or more of them */
        float scale = (float)BINS / (hi - t0);
        if (!(scale < INFINITY)) return row_largest_general(x, v, k, blocks, found, top, ids);
        int64_t count[BINS] = {0};
        for (int64_t a = 0; a < n; a++) {
            float at = (bm[cand[a]] - t0) * scale;
            int64_t i = at >= (float)(BINS - 1) ? BINS - 1 : (int64_t)at;
            bin[a] = (uint16_t)i;
            count[i]++;
        }
        int64_t lowest = BINS - 1, kept = count[BINS - 1];
        while (kept < k) kept += count[--lowest];  /* ends at bin 0 at the latest: all n >= k candidates */
        if (kept > 4 * k) return row_largest_general(x, v, k, blocks, found, top, ids);
        int64_t m = 0;
        for (int64_t a = 0; a < n; a++) { cand[m] = cand[a]; m += bin[a] >= lowest; }
        n = m;
    }
    float t = INFINITY;
    for (int64_t a = 0; a < n; a++) t = bm[cand[a]] < t ? bm[cand[a]] : t;
    int64_t m = 0;
    for (int64_t a = 0; a < n; a++) {
        int64_t b = cand[a], len = b < full ? BLOCK : v - b * BLOCK;
        const float *y = x + b * BLOCK;
        uint32_t reach = 0;  /* bit j: y[j] >= t (BLOCK is 32) */
        if (len == BLOCK) {
            #pragma omp simd reduction(|:reach)
            for (int j = 0; j < BLOCK; j++) reach |= (uint32_t)(y[j] >= t) << j;
        } else {
            for (int64_t j = 0; j < len; j++) reach |= (uint32_t)(y[j] >= t) << j;
        }
        for (; reach; reach &= reach - 1) {
            int64_t j = lowest_bit(reach);
            found[m].value = y[j];
            found[m++].id = b * BLOCK + j;
        }
    }
    select_largest(found, m, k);
    for (int64_t a = 0; a < k; a++) {
        top[a] = found[a].value;
        ids[a] = found[a].id;
    }
    return 0;
}

/* Pass 2: block sums of e = exp(x - max) outside the top k, their total, and the sums of e^a over the row. */
static void row_sums(const float *x, int64_t v, int64_t k, const float *top, const int64_t *ids, int n_exp,
                     const float *exponents, float *block_sums, double *tail_sum, double *tempered,
                     const float *next) {
    int64_t n_blocks = (v + BLOCK - 1) / BLOCK, full = v / BLOCK;
    float most = top[0], kth = top[0];
    for (int64_t a = 1; a < k; a++) { most = top[a] > most ? top[a] : most; kth = top[a] < kth ? top[a] : kth; }
    float e[BLOCK], lanes[MAX_EXPONENTS][BLOCK];
    double tail = 0.0, sums[MAX_EXPONENTS] = {0.0};
    memset(lanes, 0, sizeof lanes);
    for (int64_t b = 0; b < n_blocks; b++) {
        const float *y = x + b * BLOCK;
        int64_t len = b < full ? BLOCK : v - b * BLOCK;
        float s = 0.0f;
        if (next) prefetch_block(next + b * BLOCK, len);
        int ties = 0;
        if (b < full) {
            #pragma omp simd reduction(+:s) reduction(|:ties)
            for (int j = 0; j < BLOCK; j++) {
                e[j] = exp_poly(y[j] - most);
                s += y[j] < kth ? e[j] : 0.0f;
                ties |= y[j] == kth;
            }
        } else {
            for (int j = 0; j < BLOCK; j++) {
                e[j] = j < len ? exp_poly(y[j] - most) : 0.0f;
                s += j < len && y[j] < kth ? e[j] : 0.0f;
                ties |= j < len && y[j] == kth;
            }
        }
        for (int j = 0; ties && j < len; j++)  /* a value equal to the k-th is in the tail unless it is kept */
            if (y[j] == kth && !is_kept(ids, k, b * BLOCK + j)) s += e[j];
        block_sums[b] = s;
        tail += s;
        for (int t = 0; t < n_exp; t++) {
            float a = exponents[t], *acc = lanes[t];
            if (a == 1.0f) {
                #pragma omp simd
                for (int j = 0; j < BLOCK; j++) acc[j] += e[j];
            } else if (a == 0.5f) {
                #pragma omp simd
                for (int j = 0; j < BLOCK; j++) acc[j] += sqrtf(e[j]);
            } else {
                #pragma omp simd
                for (int j = 0; j < BLOCK; j++) acc[j] += j < len ? exp_poly((y[j] - most) * a) : 0.0f;
            }
        }
        if ((b + 1) % FLUSH == 0 || b == n_blocks - 1) {  /* float lanes for speed, float64 for the row's total */
            for (int t = 0; t < n_exp; t++)
                for (int j = 0; j < BLOCK; j++) { sums[t] += lanes[t][j]; lanes[t][j] = 0.0f; }
        }
    }
    *tail_sum = tail;
    for (int t = 0; t < n_exp; t++) tempered[t] = sums[t];
}

/* The tail draws: `m` systematic points (u + i) / m of the tail's mass, each placed first on the cumulative block
 * sums and then within its block on the cumulative terms, in float64; `draws` (m) ascending. As
 * distill.storage.labels._systematic, from the same terms as the block sums (kept ids weigh nothing). */
static void row_draws(const float *x, int64_t v, int64_t k, const float *top, const int64_t *ids,
                      const float *block_sums, int64_t m, float offset, int64_t *draws) {
    int64_t n_blocks = (v + BLOCK - 1) / BLOCK, b = 0;
    double total = 0.0, before = 0.0;
    for (int64_t a = 0; a < n_blocks; a++) total += block_sums[a];
    float most = top[0], kth = top[0];
    for (int64_t a = 1; a < k; a++) { most = top[a] > most ? top[a] : most; kth = top[a] < kth ? top[a] : kth; }
    int64_t at = -1;
    double local[BLOCK];
    for (int64_t i = 0; i < m; i++) {
        double point = ((double)offset + (double)i) / (double)m * total;
        double below = nextafter(total, 0.0);
        point = point < below ? point : below;
        while (b < n_blocks - 1 && before + block_sums[b] <= point) before += block_sums[b++];
        if (b != at) {  /* the block's terms, cumulated in float64 */
            const float *y = x + b * BLOCK;
            int64_t len = v - b * BLOCK < BLOCK ? v - b * BLOCK : BLOCK;
            float e[BLOCK];
            int ties = 0;
            #pragma omp simd reduction(|:ties)
            for (int j = 0; j < BLOCK; j++) {
                float t = j < len ? exp_poly(y[j] - most) : 0.0f;
                e[j] = j < len && y[j] <= kth ? t : 0.0f;
                ties |= j < len && y[j] == kth;
            }
            for (int64_t j = 0; ties && j < len; j++)  /* a kept id equal to the k-th weighs nothing either */
                if (y[j] == kth && is_kept(ids, k, b * BLOCK + j)) e[j] = 0.0f;
            double run = 0.0;
            for (int j = 0; j < BLOCK; j++) { run += e[j]; local[j] = run; }
            at = b;
        }
        double left = point - before, inside = nextafter(local[BLOCK - 1], 0.0);
        left = left < inside ? left : inside;
        int64_t step = 0;
        while (step < BLOCK - 1 && local[step] <= left) step++;
        int64_t id = b * BLOCK + step;
        draws[i] = id < v - 1 ? id : v - 1;
    }
}

/* rows of `logits` (row stride `stride`, unit column stride); outputs row-major: top/ids (rows, k),
 * block_sums (rows, ceil(v / BLOCK)), tail_sums (rows), tempered (rows, n_exp), and with m > 0 the tail draws
 * (rows, m) from each row's offset in `offsets` (rows). */
int distill_topk_reduce(const float *logits, int64_t rows, int64_t v, int64_t stride, int64_t k, int n_exp,
                        const float *exponents, float *top, int64_t *ids, float *block_sums, double *tail_sums,
                        double *tempered, int64_t m, const float *offsets, int64_t *draws) {
    int64_t n_blocks = (v + BLOCK - 1) / BLOCK;
    if (k < 1 || n_blocks < k || n_exp < 0 || n_exp > MAX_EXPONENTS) return 2;
    item *blocks = malloc(sizeof(item) * (size_t)(2 * k));
    /* pass 1's candidate blocks: up to k + 16 unbinned, or 4k binned; the general path's k */
    item *found = malloc(sizeof(item) * (size_t)((4 * k + 16) * BLOCK));
    float *bm = malloc(sizeof(float) * (size_t)n_blocks);
    uint16_t *bin = malloc(sizeof(uint16_t) * (size_t)n_blocks);
    int64_t *cand = malloc(sizeof(int64_t) * (size_t)(n_blocks + 1));
    int status = blocks && found && bm && bin && cand ? 0 : 3;
    for (int64_t r = 0; r < rows && status == 0; r++) {
        const float *x = logits + r * stride;
        status = row_largest(x, v, k, bm, bin, cand, blocks, found, top + r * k, ids + r * k);
        if (status == 0)
            row_sums(x, v, k, top + r * k, ids + r * k, n_exp, exponents, block_sums + r * n_blocks,
                     tail_sums + r, tempered + r * n_exp, r + 1 < rows ? x + stride : NULL);
        if (status == 0 && m > 0)
            row_draws(x, v, k, top + r * k, ids + r * k, block_sums + r * n_blocks, m, offsets[r], draws + r * m);
    }
    free(blocks);
    free(found);
    free(bm);
    free(bin);
    free(cand);
    return status;
}
