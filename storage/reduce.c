/* Stage one's top-k reduction of teacher logits on a CPU: two passes over each row, the second from cache.
 *
 * Built and loaded by distill/storage/native.py (C99, no dependencies; compiled with -O3 -march=native so that
 * the loops marked `omp simd` vectorise). For each row x of V float32 logits:
 *
 *   pass 1  the maximum of each block of BLOCK columns (and whether any value is NaN); the k largest block
 *           maxima (kept as they come: a block is a candidate while its maximum beats the k-th best so far);
 *           the k largest values among those k blocks' columns, which are the row's k largest (any value
 *           elsewhere has k block maxima at least as large above it);
 *   pass 2  e = exp(x - max) once per value, with a vectorised polynomial (relative error about 1e-7); the
 *           sum of each block's e outside the top k (the tail's block sums, which place the tail draws),
 *           the tail's sum, and for each exponent a the sum of e^a over every value (the tempered
 *           normalisers: a = 1/T; a = 1/2 is a square root, any other a a second exp).
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

/* Pass 1: the row's k largest values and their ids (in no order) into top/ids; 0, or 1 for a NaN, +inf or fewer
 * than k values above -inf. `blocks` holds up to 2k candidate blocks: each block whose maximum beats the k-th
 * largest maximum seen so far (`low`), cut back to the k largest whenever it fills. */
static int row_largest(const float *x, int64_t v, int64_t k, item *blocks, item *found, float *top, int64_t *ids) {
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

/* Pass 2: block sums of e = exp(x - max) outside the top k, their total, and the sums of e^a over the row. */
static void row_sums(const float *x, int64_t v, int64_t k, const float *top, const int64_t *ids, int n_exp,
                     const float *exponents, float *block_sums, double *tail_sum, double *tempered) {
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
    item *found = malloc(sizeof(item) * (size_t)(k * BLOCK));
    int status = blocks && found ? 0 : 3;
    for (int64_t r = 0; r < rows && status == 0; r++) {
        const float *x = logits + r * stride;
        status = row_largest(x, v, k, blocks, found, top + r * k, ids + r * k);
        if (status == 0)
            row_sums(x, v, k, top + r * k, ids + r * k, n_exp, exponents, block_sums + r * n_blocks,
                     tail_sums + r, tempered + r * n_exp);
        if (status == 0 && m > 0)
            row_draws(x, v, k, top + r * k, ids + r * k, block_sums + r * n_blocks, m, offsets[r], draws + r * m);
    }
    free(blocks);
    free(found);
    return status;
}
