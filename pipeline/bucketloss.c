/* The dense bucket loss (distill.pipeline.fused.dense_bucket_loss) for a classifier's few outputs, on a CPU.
 *
 * Built and loaded by distill/storage/native.py. One pass per position over its C logits computes what the
 * torch path computes in about fifty whole-tensor operations (each a few microseconds at 256 x 10): the
 * student's tempered log-softmax, the forward KL over the K kept ids and the tail bucket, the untempered
 * cross-entropy on the hard label, and the gradient of alpha * ce + (1 - alpha) * T^2 * soft w.r.t. the
 * logits. float32 math as the torch path, float64 sums over positions. (Rows of a few values do not
 * vectorise: a vectorised exp over each row, padded to whole vectors, was slower than libm's expf here.)
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LOG_FLOOR (-87.33654475055310898657f)  /* log(float32's smallest normal): a bucket the student leaves empty */

/* out = x * scale - logsumexp(x * scale); ez = exp(x * scale - max), returned with their sum in *sum */
static float log_softmax(const float *x, int64_t c, float scale, float *out, float *ez) {
    float most = -INFINITY, sum = 0.0f;
    for (int64_t j = 0; j < c; j++) { out[j] = scale == 1.0f ? x[j] : x[j] * scale; most = out[j] > most ? out[j] : most; }
    for (int64_t j = 0; j < c; j++) { ez[j] = expf(out[j] - most); sum += ez[j]; }
    float lse = most + logf(sum);
    for (int64_t j = 0; j < c; j++) out[j] -= lse;
    return sum;
}

/* x (P, C) student logits; ids (P, K) distinct kept ids; lp (P, K) and tail_lp (P) the teacher's tempered
 * log-probs; hard (P) labels or NULL; inv_t = 1 / T. Writes out[0] = the KL summed over positions, out[1] = the
 * cross-entropy summed over labelled positions, out[2] = their number, and with grad (P, C) the gradient of the
 * mean loss. Returns 0, or 1 for an id or label out of range (the caller takes the torch path, which says so). */
int distill_dense_bucket_loss(const float *x, int64_t p_count, int64_t c, const int64_t *ids, int64_t k,
                              const float *lp, const float *tail_lp, const int64_t *hard, float inv_t, float alpha,
                              int64_t ignore_index, float *grad, double *out) {
    int64_t labelled = 0;
    for (int64_t p = 0; p < p_count * k; p++)
        if (ids[p] < 0 || ids[p] >= c) return 1;
    for (int64_t p = 0; hard && p < p_count; p++) {
        if (hard[p] == ignore_index) continue;
        if (hard[p] < 0 || hard[p] >= c) return 1;
        labelled++;
    }
    float *buf = malloc(sizeof(float) * (size_t)(5 * c + k));
    unsigned char *kept = calloc((size_t)c, 1);
    if (!buf || !kept) { free(buf); free(kept); return 2; }
    float *lq = buf, *ez = buf + c, *e = buf + 2 * c, *lq1 = buf + 3 * c, *ez1 = buf + 4 * c, *ph = buf + 5 * c;
    float t = 1.0f / inv_t, w_soft = (1.0f - alpha) * t * t;
    float g_soft = w_soft / (t * (float)(p_count > 1 ? p_count : 1));
    float w_ce = alpha / (float)(labelled > 1 ? labelled : 1);
    double div = 0.0, ce = 0.0;
    for (int64_t p = 0; p < p_count; p++) {
        const float *row = x + p * c, *a = lp + p * k;
        const int64_t *id = ids + p * k;
        float total = log_softmax(row, c, inv_t, lq, ez);  /* q_j = ez_j / total */
        float s = 0.0f, e_sum = 0.0f, w_t = 0.0f;
        for (int64_t i = 0; i < k; i++) ph[i] = expf(a[i]);
        for (int64_t i = 0; i < k; i++) {
            float hl = lq[id[i]];
            div += ph[i] * ((a[i] > -INFINITY ? a[i] : 0.0f) - (hl > -INFINITY ? hl : LOG_FLOOR));
            ph[i] = hl > -INFINITY ? ph[i] : 0.0f;  /* a bucket the student leaves empty takes no gradient */
            s += ph[i];
            kept[id[i]] = 1;
        }
        if (k < c) {  /* the tail: its log q exactly, however small (exp relative to the tail's own max) */
            float m = -INFINITY;
            for (int64_t j = 0; j < c; j++) m = !kept[j] && lq[j] > m ? lq[j] : m;
            m = m > -1e30f ? m : -1e30f;
            for (int64_t j = 0; j < c; j++) { e[j] = kept[j] ? 0.0f : expf(lq[j] - m); e_sum += e[j]; }
            float tail_lq = logf(e_sum) + m, at = tail_lp[p], pt = expf(at);
            div += pt * ((at > -INFINITY ? at : 0.0f) - (tail_lq > -INFINITY ? tail_lq : LOG_FLOOR));
            w_t = tail_lq > -INFINITY ? pt : 0.0f;
            s += w_t;
        }
        int has_label = hard && alpha > 0.0f && hard[p] != ignore_index;
        float total1 = total;
        if (has_label && inv_t == 0.5f) {  /* the cross-entropy at T = 1: exp(x - max x) is ez^2, no second exp */
            total1 = 0.0f;
            for (int64_t j = 0; j < c; j++) { ez1[j] = ez[j] * ez[j]; total1 += ez1[j]; }
            float most = -INFINITY;
            for (int64_t j = 0; j < c; j++) most = row[j] > most ? row[j] : most;
            ce -= row[hard[p]] - most - logf(total1);
        } else if (has_label) {
            if (inv_t != 1.0f) total1 = log_softmax(row, c, 1.0f, lq1, ez1);
            ce -= inv_t != 1.0f ? lq1[hard[p]] : lq[hard[p]];
        }
        if (grad) {  /* d KL / d z_j = s q_j - target_j: target the teacher's p on the kept ids, p_tail q_j / q_tail on the tail */
            float *g = grad + p * c, share = w_t / (e_sum > 1e-30f ? e_sum : 1e-30f), inv = 1.0f / total;
            for (int64_t j = 0; j < c; j++) g[j] = s * (ez[j] * inv) - (k < c ? e[j] * share : 0.0f);
            for (int64_t i = 0; i < k; i++) g[id[i]] -= ph[i];
            for (int64_t j = 0; j < c; j++) g[j] *= g_soft;
            if (has_label) {
                const float *q1 = inv_t != 1.0f ? ez1 : ez;
                float inv1 = w_ce / total1;
                for (int64_t j = 0; j < c; j++) g[j] += q1[j] * inv1;
                g[hard[p]] -= w_ce;
            }
        }
        for (int64_t i = 0; i < k; i++) kept[id[i]] = 0;
    }
    free(buf);
    free(kept);
    out[0] = div;
    out[1] = ce;
    out[2] = (double)labelled;
    return 0;
}
