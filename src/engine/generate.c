/* Text generation on top of a backend (sb_backend_forward): prefill the prompt, then pick, stream
 * and feed back one token at a time (sparsamba.h: sb_generate). The sampler is the textbook one,
 * in HF transformers' order: logits / temperature -> top-k -> softmax -> top-p -> one draw of
 * splitmix64 (Steele, Lea & Flood 2014: a 64-bit counter through a fixed mixer; small, seekable, and
 * the same numbers on every platform). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "sparsamba.h"

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static double uniform01(uint64_t *s) { return (double)(splitmix64(s) >> 11) * 0x1.0p-53; } /* [0, 1) */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    float v; /* logit / temperature, then probability */
    int32_t id;
} cand;

/* descending value, then ascending id: a total order, so ties sample the same on every libc */
static int cand_before(const cand *a, const cand *b) { return a->v != b->v ? a->v > b->v : a->id < b->id; }
static int cand_cmp(const void *x, const void *y) {
    const cand *a = x, *b = y;
    return cand_before(a, b) ? -1 : cand_before(b, a);
}

/* the k first candidates of c[0..n) in cand_before order moved to c[0..k), sorted: a min-heap of
 * the best k so far, O(n log k) */
static void top_k_sorted(cand *c, int32_t n, int32_t k) {
    for (int32_t i = 0; i < n; i++) {
        cand x = c[i];
        int32_t j;
        if (i < k) { /* sift up: the heap's root is the worst kept */
            for (j = i; j > 0 && cand_before(&c[(j - 1) / 2], &x); j = (j - 1) / 2) c[j] = c[(j - 1) / 2];
            c[j] = x;
        } else if (cand_before(&x, &c[0])) {
            for (j = 0;;) { /* replace the root, sift down */
                int32_t ch = 2 * j + 1;
                if (ch >= k) break;
                if (ch + 1 < k && cand_before(&c[ch], &c[ch + 1])) ch++;
                if (!cand_before(&x, &c[ch])) break;
                c[j] = c[ch], j = ch;
            }
            c[j] = x;
        }
    }
    qsort(c, (size_t)k, sizeof *c, cand_cmp);
}

/* the first index of the largest logit (a NaN never, unless every logit is one: then 0). The maximum in 8
 * lanes first: one compare chain through all V logits took ~1% of a 130M model's greedy token. */
static int32_t argmax(const float *logits, int32_t V) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int32_t v = 0;
    for (; v + 8 <= V; v += 8)
        for (int l = 0; l < 8; l++) m[l] = logits[v + l] > m[l] ? logits[v + l] : m[l];
    for (; v < V; v++) m[0] = logits[v] > m[0] ? logits[v] : m[0];
    float mx = m[0];
    for (int l = 1; l < 8; l++) mx = m[l] > mx ? m[l] : mx;
    for (v = 0; v < V; v++)
        if (logits[v] == mx) return v;
    return 0;
}

static int32_t pick(const float *logits, int32_t V, const sb_gen_params *p, cand *c, uint64_t *rng) {
    if (p->temperature <= 0) return argmax(logits, V);
    int32_t n = V;
    for (int32_t v = 0; v < V; v++) c[v] = (cand){logits[v] / p->temperature, v};
    if (p->top_k > 0 && p->top_k < V) {
        top_k_sorted(c, V, p->top_k);
        n = p->top_k;
    } else if (p->top_p < 1) {
        qsort(c, (size_t)V, sizeof *c, cand_cmp);
    }
    float mx = c[0].v;
    for (int32_t i = 1; i < n; i++) mx = c[i].v > mx ? c[i].v : mx;
    double sum = 0;
    for (int32_t i = 0; i < n; i++) sum += c[i].v = expf(c[i].v - mx);
    if (p->top_p < 1) { /* c is sorted here: keep the shortest head reaching top_p of the mass */
        double acc = 0;
        int32_t keep = 0;
        while (keep < n && acc < p->top_p * sum) acc += c[keep++].v;
        n = keep ? keep : 1;
        sum = acc > 0 ? acc : c[0].v;
    }
    double r = uniform01(rng) * sum;
    for (int32_t i = 0; i < n; i++) {
        r -= c[i].v;
        if (r < 0) return c[i].id;
    }
    return c[n - 1].id; /* rounding left r >= 0 */
}

void sb_gen_defaults(sb_gen_params *p) {
    *p = (sb_gen_params){.n_predict = 16, .temperature = 0, .top_k = 0, .top_p = 1, .seed = 0, .stop_at_eos = 1,
                         .stop = NULL};
}

int sb_generate(sb_backend *b, const sb_tokenizer *t, const int32_t *prompt, int32_t n_prompt, const sb_gen_params *p,
                sb_token_fn on_token, void *user, int32_t *out, sb_gen_stats *stats, char *err, size_t errlen) {
    sb_gen_stats st = {n_prompt, 0, 0, 0, SB_STOP_LENGTH};
    if (stats) *stats = st;
    if (p->n_predict <= 0) {
        snprintf(err, errlen, "the number of tokens to generate must be > 0 (got %d)", p->n_predict);
        return SB_ERR_ARG;
    }
    if (!(p->temperature >= 0) || isinf(p->temperature)) {
        snprintf(err, errlen, "temperature must be a finite number >= 0 (0 = greedy), got %g", (double)p->temperature);
        return SB_ERR_ARG;
    }
    if (p->top_k < 0) {
        snprintf(err, errlen, "top-k must be >= 0 (0 = every token), got %d", p->top_k);
        return SB_ERR_ARG;
    }
    if (!(p->top_p > 0 && p->top_p <= 1)) {
        snprintf(err, errlen, "top-p must be in (0, 1] (1 = every token), got %g", (double)p->top_p);
        return SB_ERR_ARG;
    }
    if (n_prompt <= 0 || !prompt) {
        snprintf(err, errlen, "the prompt is empty; give at least one token");
        return SB_ERR_ARG;
    }
    sb_info I;
    sb_model_info(sb_backend_model(b), &I);
    int32_t V = I.vocab_size, eos = t && p->stop_at_eos ? sb_token_eos(t) : -1;
    size_t stop_len = t && p->stop ? strlen(p->stop) : 0;
    float *logits = malloc(sizeof(float) * (size_t)V);
    cand *c = p->temperature > 0 ? malloc(sizeof(cand) * (size_t)V) : NULL;
    char *tail = stop_len ? malloc(2 * stop_len + 64) : NULL; /* the text's last stop_len - 1 bytes + a piece */
    size_t tail_len = 0, tail_cap = stop_len ? 2 * stop_len + 64 : 0;
    sb_stream *ss = NULL;
    int rc = SB_ERR_NOMEM;
    if (!logits || (p->temperature > 0 && !c) || (stop_len && !tail)) {
        snprintf(err, errlen, "out of memory for the logits of %d tokens", V);
        goto done;
    }
    if (t && (rc = sb_stream_new(t, &ss, err, errlen))) goto done;
    if ((rc = sb_backend_reset(b, err, errlen))) goto done;
    double t0 = now_s();
    if ((rc = sb_backend_forward(b, prompt, n_prompt, logits, 1, err, errlen))) goto done;
    double t1 = now_s();
    st.prompt_s = t1 - t0;
    uint64_t rng = p->seed;
    for (int32_t g = 0; g < p->n_predict; g++) {
        int32_t tok = pick(logits, V, p, c, &rng);
        if (out) out[g] = tok;
        st.n_gen = g + 1;
        const char *text = "";
        size_t len = 0;
        if (ss && (rc = sb_stream_push(ss, tok, &text, &len, err, errlen))) goto done;
        if (on_token && on_token(tok, text, len, user)) {
            st.stop_reason = SB_STOP_CALLBACK;
            break;
        }
        if (tok == eos) {
            st.stop_reason = SB_STOP_EOS;
            break;
        }
        if (stop_len) { /* the stop string ends inside this token's text, or across the tail before it */
            if (tail_len + len > tail_cap) {
                char *nt = realloc(tail, tail_len + len);
                if (!nt) {
                    rc = SB_ERR_NOMEM;
                    snprintf(err, errlen, "out of memory");
                    goto done;
                }
                tail = nt, tail_cap = tail_len + len;
            }
            memcpy(tail + tail_len, text, len);
            tail_len += len;
            int hit = 0;
            for (size_t i = 0; !hit && i + stop_len <= tail_len; i++) hit = !memcmp(tail + i, p->stop, stop_len);
            if (hit) {
                st.stop_reason = SB_STOP_STRING;
                break;
            }
            size_t keep = tail_len < stop_len - 1 ? tail_len : stop_len - 1;
            memmove(tail, tail + tail_len - keep, keep);
            tail_len = keep;
        }
        if (g + 1 < p->n_predict && (rc = sb_backend_forward(b, &tok, 1, logits, 1, err, errlen))) goto done;
    }
    st.gen_s = now_s() - t1;
    if (ss && on_token && st.stop_reason != SB_STOP_CALLBACK) {
        char rest[4];
        size_t n = sb_stream_flush(ss, rest);
        if (n) on_token(-1, rest, n, user);
    }
    rc = SB_OK;
done:
    if (stats) *stats = st;
    free(logits);
    free(c);
    free(tail);
    sb_stream_free(ss);
    return rc;
}
