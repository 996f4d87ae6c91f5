/* The byte-level BPE tokenizer of Mamba / GPT-NeoX / GPT-2 models, read from a packed GGUF's
 * `tokenizer.ggml.*` keys (docs/packed-format.md), with the ids of HF `tokenizers` for the
 * tokenizer.json those keys were written from (tests/test_tokenizer_c.py checks it).
 *
 * encode: text (lossy UTF-8, as Rust's from_utf8_lossy) -> split on added tokens (leftmost-longest)
 *         -> GPT-2's pre-tokenizer regex on each segment -> bytes mapped to GPT-2's printable
 *         characters -> BPE merges by rank -> ids
 * decode: id -> the bytes it stands for (GPT-2's map inverted; special / unused ids give nothing,
 *         as tokenizers' decode(skip_special_tokens=True)) -> lossy UTF-8, streamed by sb_stream.
 *
 * Glossary: a "piece" is a token's decoded bytes; a "word" is one pre-token (one regex match); a
 * "symbol" is a token id inside a word while BPE merges it. The tokenizer copies what it keeps out
 * of the model's mapping, so it may outlive the model. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine.h"
#include "unicode_tables.h"

enum { TT_NORMAL = 1, TT_UNKNOWN = 2, TT_CONTROL = 3, TT_USER_DEFINED = 4, TT_UNUSED = 5, TT_BYTE = 6 };

typedef struct {
    uint64_t key; /* (left id << 32) | right id; 0 = empty slot is impossible: key holds id + 1 pairs */
    int32_t rank, merged;
} merge_slot;

struct sb_tokenizer {
    int32_t n_vocab;
    char *text;               /* every token's GGUF text, NUL-separated */
    uint32_t *text_off;       /* (n_vocab + 1,) offsets into text */
    uint8_t *piece;           /* every token's decoded bytes */
    uint32_t *piece_off;      /* (n_vocab + 1,) offsets into piece */
    int32_t *type;            /* (n_vocab,) gguf TokenType */
    int32_t *vocab_slot;      /* (vocab_cap,) open-addressing hash: text -> id, -1 empty */
    uint32_t vocab_cap;
    merge_slot *merge;        /* (merge_cap,) open-addressing hash: (left, right) -> rank, merged id */
    uint32_t merge_cap;
    int32_t byte_id[256];     /* id of the one-character token of each byte, or -1 */
    int32_t fallback_id[256]; /* id of <0xXX>, or -1 (byte fallback) */
    int32_t *added;           /* ids of the added tokens (control and user-defined), longest first */
    int32_t n_added;
    int32_t bos, eos;         /* -1 when the file names none */
};

/* ---------------------------------------------------------------------------------------------
 * UTF-8 and Unicode classes */

/* One character of s[0..n): its length and code point. An invalid sequence is its maximal valid
 * prefix (at least one byte) standing for U+FFFD, as Python's errors="replace" and Rust's
 * from_utf8_lossy cut it; *incomplete says the prefix was cut short by the end of s only. */
static size_t utf8_next(const uint8_t *s, size_t n, uint32_t *cp, int *incomplete) {
    uint8_t b = s[0];
    *incomplete = 0;
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    int need;
    uint8_t lo = 0x80, hi = 0xBF; /* the range of the second byte */
    uint32_t c;
    if (b >= 0xC2 && b <= 0xDF) need = 1, c = b & 0x1F;
    else if (b >= 0xE0 && b <= 0xEF) {
        need = 2, c = b & 0x0F;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3, c = b & 0x07;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        *cp = 0xFFFD;
        return 1;
    }
    for (int i = 1; i <= need; i++) {
        if ((size_t)i >= n) {
            *incomplete = 1;
            *cp = 0xFFFD;
            return (size_t)i;
        }
        uint8_t x = s[i];
        if (x < (i == 1 ? lo : 0x80) || x > (i == 1 ? hi : 0xBF)) {
            *cp = 0xFFFD;
            return (size_t)i;
        }
        c = c << 6 | (x & 0x3F);
    }
    *cp = c;
    return (size_t)need + 1;
}

static size_t utf8_put(uint32_t c, uint8_t *o) {
    if (c < 0x80) return o[0] = (uint8_t)c, 1;
    if (c < 0x800) return o[0] = (uint8_t)(0xC0 | c >> 6), o[1] = (uint8_t)(0x80 | (c & 0x3F)), 2;
    if (c < 0x10000) {
        o[0] = (uint8_t)(0xE0 | c >> 12), o[1] = (uint8_t)(0x80 | (c >> 6 & 0x3F)), o[2] = (uint8_t)(0x80 | (c & 0x3F));
        return 3;
    }
    o[0] = (uint8_t)(0xF0 | c >> 18), o[1] = (uint8_t)(0x80 | (c >> 12 & 0x3F));
    o[2] = (uint8_t)(0x80 | (c >> 6 & 0x3F)), o[3] = (uint8_t)(0x80 | (c & 0x3F));
    return 4;
}

static int in_ranges(const sb_cp_range *r, size_t n, uint32_t c) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (c < r[mid].lo) hi = mid;
        else if (c > r[mid].hi) lo = mid + 1;
        else return 1;
    }
    return 0;
}

#define NRANGES(t) (sizeof(t) / sizeof(t[0]))
static int is_letter(uint32_t c) {
    if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
    return in_ranges(sb_letter_ranges, NRANGES(sb_letter_ranges), c);
}
static int is_number(uint32_t c) {
    if (c < 0x80) return c >= '0' && c <= '9';
    return in_ranges(sb_number_ranges, NRANGES(sb_number_ranges), c);
}
static int is_space(uint32_t c) { return in_ranges(sb_space_ranges, NRANGES(sb_space_ranges), c); }

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes for
 * U+0100.. in byte order, so that every byte is a visible character of the vocabulary */
static uint32_t byte_char(int b) {
    if ((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF)) return (uint32_t)b;
    int k = 0;
    for (int x = 0; x < b; x++)
        if (!((x >= 0x21 && x <= 0x7E) || (x >= 0xA1 && x <= 0xAC) || (x >= 0xAE && x <= 0xFF))) k++;
    return 256 + (uint32_t)k;
}

/* ---------------------------------------------------------------------------------------------
 * Hash tables (open addressing, linear probing, power-of-two sizes at most half full) */

static uint64_t hash_bytes(const void *p, size_t n) { /* FNV-1a */
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t *)p)[i]) * 1099511628211ULL;
    return h;
}

static uint64_t hash_u64(uint64_t x) { /* splitmix64's finaliser */
    x ^= x >> 30, x *= 0xbf58476d1ce4e5b9ULL, x ^= x >> 27, x *= 0x94d049bb133111ebULL;
    return x ^ x >> 31;
}

static uint32_t table_cap(uint64_t n) {
    uint32_t c = 16;
    while (c < 2 * n) c *= 2;
    return c;
}

static int32_t vocab_find(const sb_tokenizer *t, const void *s, size_t n) {
    for (uint32_t i = (uint32_t)hash_bytes(s, n) & (t->vocab_cap - 1);; i = (i + 1) & (t->vocab_cap - 1)) {
        int32_t id = t->vocab_slot[i];
        if (id < 0) return -1;
        if (t->text_off[id + 1] - t->text_off[id] - 1 == n && !memcmp(t->text + t->text_off[id], s, n)) return id;
    }
}

static void vocab_add(sb_tokenizer *t, int32_t id) {
    const char *s = t->text + t->text_off[id];
    size_t n = t->text_off[id + 1] - t->text_off[id] - 1;
    if (vocab_find(t, s, n) >= 0) return; /* a repeated text keeps its first id */
    uint32_t i = (uint32_t)hash_bytes(s, n) & (t->vocab_cap - 1);
    while (t->vocab_slot[i] >= 0) i = (i + 1) & (t->vocab_cap - 1);
    t->vocab_slot[i] = id;
}

static const merge_slot *merge_find(const sb_tokenizer *t, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(a + 1) << 32 | (uint32_t)(b + 1);
    for (uint32_t i = (uint32_t)hash_u64(key) & (t->merge_cap - 1);; i = (i + 1) & (t->merge_cap - 1)) {
        if (t->merge[i].key == key) return &t->merge[i];
        if (!t->merge[i].key) return NULL;
    }
}

static void merge_add(sb_tokenizer *t, int32_t a, int32_t b, int32_t rank, int32_t merged) {
    uint64_t key = (uint64_t)(a + 1) << 32 | (uint32_t)(b + 1);
    uint32_t i = (uint32_t)hash_u64(key) & (t->merge_cap - 1);
    while (t->merge[i].key && t->merge[i].key != key) i = (i + 1) & (t->merge_cap - 1);
    /* a pair listed twice takes its later rank, as tokenizers' map of merges does */
    t->merge[i] = (merge_slot){key, rank, merged};
}

/* ---------------------------------------------------------------------------------------------
 * Loading: arrays of the GGUF, every length checked against the mapping */

typedef struct {
    const uint8_t *p, *end;
} rd;

static int rd_u64(rd *r, uint64_t *v) {
    if (r->end - r->p < 8) return 0;
    memcpy(v, r->p, 8);
    r->p += 8;
    return 1;
}

/* the array under key: element type and count, r positioned at the first element */
static int get_array(const gg_file *f, const char *key, uint32_t *etype, uint64_t *n, rd *r, char *err, size_t errlen) {
    const gg_kv *kv = gg_find_kv(f, key);
    *etype = 0, *n = 0;
    if (!kv) {
        snprintf(err, errlen, "missing key '%s'", key);
        return SB_ERR_FORMAT;
    }
    r->p = kv->val;
    r->end = f->base + f->size;
    if (kv->type != GV_ARRAY || r->end - r->p < 12) {
        snprintf(err, errlen, "key '%s' has type %u, expected an array", key, kv->type);
        return SB_ERR_FORMAT;
    }
    memcpy(etype, r->p, 4);
    r->p += 4;
    rd_u64(r, n);
    return SB_OK;
}

static int opt_id(const gg_file *f, const char *key, int32_t n_vocab, int32_t *out, char *err, size_t errlen) {
    *out = -1;
    if (!gg_find_kv(f, key)) return SB_OK;
    uint32_t v;
    int rc = gg_get_u32(f, key, &v, err, errlen);
    if (rc) return rc;
    if ((int64_t)v >= n_vocab) {
        snprintf(err, errlen, "tokenizer: %s = %u is outside the vocabulary of %d tokens", key, v, n_vocab);
        return SB_ERR_FORMAT;
    }
    *out = (int32_t)v;
    return SB_OK;
}

static int added_cmp(const void *x, const void *y, const sb_tokenizer *t) {
    int32_t a = *(const int32_t *)x, b = *(const int32_t *)y;
    uint32_t la = t->text_off[a + 1] - t->text_off[a], lb = t->text_off[b + 1] - t->text_off[b];
    return la != lb ? (la < lb) - (la > lb) : (a > b) - (a < b);
}
static _Thread_local const sb_tokenizer *sort_t;
static int added_cmp_q(const void *x, const void *y) { return added_cmp(x, y, sort_t); }

void sb_tokenizer_free(sb_tokenizer *t) {
    if (!t) return;
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->type);
    free(t->vocab_slot);
    free(t->merge);
    free(t->added);
    free(t);
}

/* a string key that, when present, must read `want` (the tokenizer kinds this engine implements) */
static int optional_str_is(const gg_file *f, const char *key, const char *want, const char *why, char *err,
                           size_t errlen) {
    const char *s;
    uint64_t len;
    if (!gg_find_kv(f, key)) return SB_OK;
    int rc = gg_get_str(f, key, &s, &len, err, errlen);
    if (rc) return rc;
    if (len != strlen(want) || memcmp(s, want, len)) {
        snprintf(err, errlen, "%s is '%.*s'; %s ('%s') only", key, (int)(len > 64 ? 64 : len), s, why, want);
        return SB_ERR_FORMAT;
    }
    return SB_OK;
}

static int load(const gg_file *f, int32_t model_vocab, sb_tokenizer *t, char *err, size_t errlen) {
    uint64_t len;
    if (!gg_find_kv(f, "tokenizer.ggml.tokens")) {
        snprintf(err, errlen, "this model has no tokenizer (the GGUF has no tokenizer.ggml.* keys)");
        return SB_ERR_ARG;
    }
    int rc = optional_str_is(f, "tokenizer.ggml.model", "gpt2", "this engine reads byte-level BPE", err, errlen);
    if (!rc) rc = optional_str_is(f, "tokenizer.ggml.pre", "gpt-2", "this engine splits text as GPT-2 does", err, errlen);
    if (rc) return rc;
    uint32_t et;
    uint64_t n;
    rd r;
    rc = get_array(f, "tokenizer.ggml.tokens", &et, &n, &r, err, errlen);
    if (rc) return rc;
    if (et != GV_STRING || n == 0 || n > (uint64_t)model_vocab) {
        snprintf(err, errlen, "tokenizer.ggml.tokens: %llu tokens of type %u (strings, 1 to the model's %d rows)",
                 (unsigned long long)n, et, model_vocab);
        return SB_ERR_FORMAT;
    }
    t->n_vocab = (int32_t)n;
    /* the strings were bounds-checked by gg_parse; their total is at most the file size */
    rd r2 = r;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (!rd_u64(&r2, &len) || (uint64_t)(r2.end - r2.p) < len) goto truncated;
        r2.p += len;
        total += len + 1;
    }
    if (total > UINT32_MAX / 2) {
        snprintf(err, errlen, "tokenizer.ggml.tokens: %llu bytes of text is more than this engine reads",
                 (unsigned long long)total);
        return SB_ERR_FORMAT;
    }
    t->text = malloc(total);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    t->piece = malloc(total);
    t->piece_off = malloc((n + 1) * sizeof *t->piece_off);
    t->type = malloc(n * sizeof *t->type);
    t->vocab_cap = table_cap(n);
    t->vocab_slot = malloc(t->vocab_cap * sizeof *t->vocab_slot);
    if (!t->text || !t->text_off || !t->piece || !t->piece_off || !t->type || !t->vocab_slot) goto nomem;
    memset(t->vocab_slot, 0xff, t->vocab_cap * sizeof *t->vocab_slot);
    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        rd_u64(&r, &len);
        t->text_off[i] = off;
        memcpy(t->text + off, r.p, len);
        t->text[off + len] = 0;
        off += (uint32_t)len + 1;
        r.p += len;
    }
    t->text_off[n] = off;

    rc = get_array(f, "tokenizer.ggml.token_type", &et, &len, &r, err, errlen);
    if (rc) return rc;
    if ((et != GV_I32 && et != GV_U32) || len != n || (uint64_t)(r.end - r.p) / 4 < n) {
        snprintf(err, errlen, "tokenizer.ggml.token_type: %llu entries of type %u (expected %llu int32)",
                 (unsigned long long)len, et, (unsigned long long)n);
        return SB_ERR_FORMAT;
    }
    memcpy(t->type, r.p, n * 4);

    /* the decoded bytes of each token, as tokenizers' ByteLevel decoder makes them: a text whose
     * characters all come from GPT-2's byte map gives those bytes, any other its own UTF-8 bytes */
    int32_t char_byte[512]; /* code point (< 512) -> byte, or -1 */
    memset(char_byte, 0xff, sizeof char_byte);
    for (int b = 0; b < 256; b++) char_byte[byte_char(b)] = b;
    uint32_t po = 0;
    for (int32_t id = 0; id < t->n_vocab; id++) {
        const uint8_t *p = (const uint8_t *)t->text + t->text_off[id];
        size_t tl = t->text_off[id + 1] - t->text_off[id] - 1, k = 0;
        t->piece_off[id] = po;
        if (t->type[id] == TT_CONTROL || t->type[id] == TT_UNUSED) continue; /* skipped when decoding */
        uint32_t start = po;
        while (k < tl) {
            uint32_t c;
            int inc;
            size_t l = utf8_next(p + k, tl - k, &c, &inc);
            if (c >= 512 || char_byte[c] < 0) break;
            t->piece[po++] = (uint8_t)char_byte[c];
            k += l;
        }
        if (k < tl) { /* not all from the byte map: the text itself */
            po = start;
            memcpy(t->piece + po, p, tl);
            po += (uint32_t)tl;
        }
    }
    t->piece_off[t->n_vocab] = po;

    for (int32_t id = 0; id < t->n_vocab; id++)
        if (t->type[id] != TT_UNUSED) vocab_add(t, id);
    int32_t n_added = 0;
    for (int32_t id = 0; id < t->n_vocab; id++)
        n_added += (t->type[id] == TT_CONTROL || t->type[id] == TT_USER_DEFINED) && t->text_off[id + 1] - t->text_off[id] > 1;
    t->added = malloc((size_t)(n_added ? n_added : 1) * sizeof *t->added);
    if (!t->added) goto nomem;
    for (int32_t id = 0; id < t->n_vocab; id++)
        if ((t->type[id] == TT_CONTROL || t->type[id] == TT_USER_DEFINED) && t->text_off[id + 1] - t->text_off[id] > 1)
            t->added[t->n_added++] = id;
    sort_t = t;
    qsort(t->added, (size_t)t->n_added, sizeof *t->added, added_cmp_q);

    for (int b = 0; b < 256; b++) {
        uint8_t u[4];
        char fb[8];
        t->byte_id[b] = vocab_find(t, u, utf8_put(byte_char(b), u));
        snprintf(fb, sizeof fb, "<0x%02X>", b);
        t->fallback_id[b] = vocab_find(t, fb, 6);
    }

    /* merges: "left right", rank = position in the list */
    rc = get_array(f, "tokenizer.ggml.merges", &et, &n, &r, err, errlen);
    if (rc == SB_ERR_FORMAT && !gg_find_kv(f, "tokenizer.ggml.merges")) n = 0, et = GV_STRING, rc = 0;
    if (rc) return rc;
    if (et != GV_STRING || n > INT32_MAX / 4) {
        snprintf(err, errlen, "tokenizer.ggml.merges: %llu entries of type %u (expected strings)", (unsigned long long)n, et);
        return SB_ERR_FORMAT;
    }
    t->merge_cap = table_cap(n);
    t->merge = calloc(t->merge_cap, sizeof *t->merge);
    if (!t->merge) goto nomem;
    for (uint64_t i = 0; i < n; i++) {
        if (!rd_u64(&r, &len) || (uint64_t)(r.end - r.p) < len) goto truncated;
        const char *m = (const char *)r.p, *sp = len > 1 ? memchr(m + 1, ' ', len - 1) : NULL;
        r.p += len;
        int32_t a = -1, b = -1, ab = -1;
        if (sp) {
            size_t la = (size_t)(sp - m), lb = len - la - 1;
            char buf[256];
            a = vocab_find(t, m, la);
            b = vocab_find(t, sp + 1, lb);
            if (la + lb <= sizeof buf) {
                memcpy(buf, m, la);
                memcpy(buf + la, sp + 1, lb);
                ab = vocab_find(t, buf, la + lb);
            }
        }
        if (a < 0 || b < 0 || ab < 0) {
            snprintf(err, errlen, "tokenizer.ggml.merges[%llu] = '%.*s' is not two tokens whose join is a token",
                     (unsigned long long)i, (int)(len > 80 ? 80 : len), m);
            return SB_ERR_FORMAT;
        }
        merge_add(t, a, b, (int32_t)i, ab);
    }
    rc = opt_id(f, "tokenizer.ggml.bos_token_id", t->n_vocab, &t->bos, err, errlen);
    if (!rc) rc = opt_id(f, "tokenizer.ggml.eos_token_id", t->n_vocab, &t->eos, err, errlen);
    return rc;
truncated:
    snprintf(err, errlen, "tokenizer: an array is truncated");
    return SB_ERR_FORMAT;
nomem:
    snprintf(err, errlen, "out of memory loading the tokenizer");
    return SB_ERR_NOMEM;
}

int sb_tokenizer_load(const sb_model *m, sb_tokenizer **out, char *err, size_t errlen) {
    *out = NULL;
    sb_tokenizer *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, errlen, "out of memory loading the tokenizer");
        return SB_ERR_NOMEM;
    }
    int rc = load(&m->gf, m->info.vocab_size, t, err, errlen);
    if (rc) {
        sb_tokenizer_free(t);
        return rc;
    }
    *out = t;
    return SB_OK;
}

int32_t sb_token_bos(const sb_tokenizer *t) { return t->bos; }
int32_t sb_token_eos(const sb_tokenizer *t) { return t->eos; }
int32_t sb_tokenizer_n_vocab(const sb_tokenizer *t) { return t->n_vocab; }

/* ---------------------------------------------------------------------------------------------
 * Encoding */

typedef struct {
    int32_t id, prev, next; /* id < 0: merged away */
} symbol;

typedef struct {
    int32_t rank, left, right, merged; /* symbols left and right merge into token merged */
} bigram;

/* min-heap order: lower rank first, then the leftmost (tokenizers' order of merges) */
static int bg_less(const bigram *a, const bigram *b) { return a->rank != b->rank ? a->rank < b->rank : a->left < b->left; }

typedef struct {
    int32_t *ids;            /* output */
    int32_t cap, n;          /* n counts every id, also those past cap */
    symbol *sym;             /* scratch for one word */
    bigram *heap;
    size_t scap;             /* capacity of sym (heap holds 2 x) */
} enc;

static void emit(enc *e, int32_t id) {
    if (e->n < e->cap) e->ids[e->n] = id;
    e->n++;
}

static void heap_push(bigram *h, int32_t *n, bigram x) {
    int32_t i = (*n)++;
    while (i > 0 && bg_less(&x, &h[(i - 1) / 2])) h[i] = h[(i - 1) / 2], i = (i - 1) / 2;
    h[i] = x;
}

static bigram heap_pop(bigram *h, int32_t *n) {
    bigram top = h[0], x = h[--*n];
    int32_t i = 0;
    for (;;) {
        int32_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && bg_less(&h[c + 1], &h[c])) c++;
        if (!bg_less(&h[c], &x)) break;
        h[i] = h[c], i = c;
    }
    if (*n) h[i] = x;
    return top;
}

static void try_pair(const sb_tokenizer *t, symbol *sym, bigram *heap, int32_t *nh, int32_t l, int32_t r) {
    if (l < 0 || r < 0) return;
    const merge_slot *m = merge_find(t, sym[l].id, sym[r].id);
    if (m) heap_push(heap, nh, (bigram){m->rank, l, r, m->merged});
}

/* BPE on one word (the bytes of one pre-token); a heap of candidate merges makes a long word cost
 * n log n, not n^2 */
static int bpe_word(const sb_tokenizer *t, enc *e, const uint8_t *w, size_t len) {
    if (len * 4 > e->scap) {
        size_t c = len * 4 + 64;
        symbol *s = realloc(e->sym, c * sizeof *s);
        if (!s) return SB_ERR_NOMEM;
        e->sym = s;
        bigram *h = realloc(e->heap, 2 * c * sizeof *h);
        if (!h) return SB_ERR_NOMEM;
        e->heap = h;
        e->scap = c;
    }
    symbol *sym = e->sym;
    int32_t ns = 0, nh = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t id = t->byte_id[w[i]];
        if (id >= 0) {
            sym[ns] = (symbol){id, ns - 1, ns + 1}, ns++;
            continue;
        }
        /* a byte the vocabulary lacks: <0xXX> tokens of its character's UTF-8 where the vocabulary
         * has them all (byte fallback), else nothing, as tokenizers does without an unk token */
        uint8_t u[4];
        size_t ul = utf8_put(byte_char(w[i]), u), k;
        for (k = 0; k < ul && t->fallback_id[u[k]] >= 0; k++) {}
        if (k == ul)
            for (k = 0; k < ul; k++) sym[ns] = (symbol){t->fallback_id[u[k]], ns - 1, ns + 1}, ns++;
    }
    if (!ns) return SB_OK;
    sym[ns - 1].next = -1;
    for (int32_t i = 0; i + 1 < ns; i++) try_pair(t, sym, e->heap, &nh, i, i + 1);
    while (nh) {
        bigram b = heap_pop(e->heap, &nh);
        symbol *L = &sym[b.left], *R = &sym[b.right];
        if (L->id < 0 || R->id < 0 || L->next != b.right) continue; /* stale: a neighbour merged first */
        const merge_slot *m = merge_find(t, L->id, R->id);
        if (!m || m->merged != b.merged) continue;
        L->id = b.merged;
        L->next = R->next;
        if (R->next >= 0) sym[R->next].prev = b.left;
        R->id = -1;
        try_pair(t, sym, e->heap, &nh, L->prev, b.left);
        try_pair(t, sym, e->heap, &nh, b.left, L->next);
    }
    for (int32_t i = 0; i >= 0; i = sym[i].next) emit(e, sym[i].id);
    return SB_OK;
}

/* GPT-2's pre-tokenizer over code points cp[0..n) (byte offsets off[0..n], off[n] = end):
 * 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * tried in that order at each position, the first alternative that matches taken (regex
 * alternation, not the longest). Returns the length of the match at i. */
static size_t gpt2_match(const uint32_t *cp, size_t n, size_t i) {
    uint32_t c = cp[i];
    if (c == '\'' && i + 1 < n) {
        uint32_t a = cp[i + 1], b = i + 2 < n ? cp[i + 2] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    }
    size_t j = i + (c == ' ' && i + 1 < n);
    if (is_letter(cp[j])) {
        while (j < n && is_letter(cp[j])) j++;
        return j - i;
    }
    if (is_number(cp[j])) {
        while (j < n && is_number(cp[j])) j++;
        return j - i;
    }
    if (!is_space(cp[j])) {
        while (j < n && !is_space(cp[j]) && !is_letter(cp[j]) && !is_number(cp[j])) j++;
        return j - i;
    }
    /* a run of whitespace: all of it at the end of the text; before a non-space all but its last
     * character (\s+(?!\S) backtracks one), which then starts the next match (" ?\p{L}+" etc.);
     * a single whitespace character before a non-space is \s+ alone */
    size_t k = i;
    while (k < n && is_space(cp[k])) k++;
    if (k == n) return k - i;
    return k - i > 1 ? k - i - 1 : 1;
}

/* one segment between added tokens: split, then BPE each word */
static int encode_segment(const sb_tokenizer *t, enc *e, const uint8_t *u, const uint32_t *cp, const size_t *off,
                          size_t n) {
    for (size_t i = 0; i < n;) {
        size_t l = gpt2_match(cp, n, i);
        int rc = bpe_word(t, e, u + off[i], off[i + l] - off[i]);
        if (rc) return rc;
        i += l;
    }
    return SB_OK;
}

/* the added token (longest first) whose text starts at u[0..n), or -1 */
static int32_t added_at(const sb_tokenizer *t, const uint8_t *u, size_t n) {
    for (int32_t k = 0; k < t->n_added; k++) {
        int32_t id = t->added[k];
        size_t l = t->text_off[id + 1] - t->text_off[id] - 1;
        if (l <= n && (uint8_t)t->text[t->text_off[id]] == u[0] && !memcmp(t->text + t->text_off[id], u, l)) return id;
    }
    return -1;
}

int sb_tokenize(const sb_tokenizer *t, const char *text, size_t len, int32_t *ids, int32_t cap, int32_t *n_ids,
                char *err, size_t errlen) {
    *n_ids = 0;
    if (cap < 0 || (cap > 0 && !ids) || (len && !text)) {
        snprintf(err, errlen, "sb_tokenize: a NULL buffer or a negative capacity");
        return SB_ERR_ARG;
    }
    if (len > (size_t)INT32_MAX / 8) { /* ids <= 6 per byte: U+FFFD for a byte, two <0xXX> per character */
        snprintf(err, errlen, "the text is %zu bytes; this engine tokenizes at most %d at once", len, INT32_MAX / 8);
        return SB_ERR_ARG;
    }
    /* lossy UTF-8 (invalid sequences become U+FFFD, as tokenizers receives them from Python's
     * errors="replace" or Rust's from_utf8_lossy), as code points with their byte offsets */
    uint8_t *u = malloc(3 * len + 4);
    uint32_t *cp = malloc((len + 1) * sizeof *cp);
    size_t *off = malloc((len + 1) * sizeof *off);
    enc e = {ids, cap, 0, NULL, NULL, 0};
    int rc = SB_ERR_NOMEM;
    if (!u || !cp || !off) goto out;
    size_t nc = 0, ul = 0;
    for (size_t i = 0; i < len;) {
        int inc;
        i += utf8_next((const uint8_t *)text + i, len - i, &cp[nc], &inc);
        off[nc] = ul;
        ul += utf8_put(cp[nc], u + ul);
        nc++;
    }
    off[nc] = ul;
    size_t seg = 0; /* start (in characters) of the segment not yet encoded */
    for (size_t i = 0; i < nc;) {
        int32_t id = t->n_added ? added_at(t, u + off[i], ul - off[i]) : -1;
        if (id < 0) {
            i++;
            continue;
        }
        if ((rc = encode_segment(t, &e, u, cp + seg, off + seg, i - seg))) goto out;
        emit(&e, id);
        size_t end = off[i] + t->text_off[id + 1] - t->text_off[id] - 1;
        while (i < nc && off[i] < end) i++;
        seg = i;
    }
    if ((rc = encode_segment(t, &e, u, cp + seg, off + seg, nc - seg))) goto out;
    *n_ids = e.n;
    rc = SB_OK;
    if (e.n > cap) {
        snprintf(err, errlen, "the text is %d tokens, more than the %d ids the buffer holds", e.n, cap);
        rc = SB_ERR_ARG;
    }
out:
    if (rc == SB_ERR_NOMEM) snprintf(err, errlen, "out of memory tokenizing %zu bytes", len);
    free(u);
    free(cp);
    free(off);
    free(e.sym);
    free(e.heap);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Decoding */

int sb_token_piece(const sb_tokenizer *t, int32_t id, const char **bytes, size_t *len) {
    if (id < 0 || id >= t->n_vocab) {
        *bytes = "", *len = 0;
        return SB_ERR_ARG;
    }
    *bytes = (const char *)t->piece + t->piece_off[id];
    *len = t->piece_off[id + 1] - t->piece_off[id];
    return SB_OK;
}

/* bytes b[0..n) as valid UTF-8 into o (room for 3n bytes), each invalid sequence one U+FFFD; with
 * hold, an incomplete sequence at the end is left out and its length returned in *held */
static size_t lossy(const uint8_t *b, size_t n, uint8_t *o, int hold, size_t *held) {
    size_t ol = 0;
    *held = 0;
    for (size_t i = 0; i < n;) {
        uint32_t c;
        int inc;
        size_t l = utf8_next(b + i, n - i, &c, &inc);
        if (inc && hold) {
            *held = n - i;
            break;
        }
        ol += utf8_put(c, o + ol);
        i += l;
    }
    return ol;
}

int sb_detokenize(const sb_tokenizer *t, const int32_t *ids, int32_t n, char *out, size_t cap, size_t *len, char *err,
                  size_t errlen) {
    *len = 0;
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab) {
            snprintf(err, errlen, "token %d (position %d) is outside the vocabulary of %d tokens", ids[i], i, t->n_vocab);
            return SB_ERR_ARG;
        }
        total += t->piece_off[ids[i] + 1] - t->piece_off[ids[i]];
    }
    uint8_t *b = malloc(total + 1), *o = malloc(3 * total + 1);
    if (!b || !o) {
        free(b);
        free(o);
        snprintf(err, errlen, "out of memory decoding %d tokens", n);
        return SB_ERR_NOMEM;
    }
    size_t bl = 0, held;
    for (int32_t i = 0; i < n; i++) {
        uint32_t po = t->piece_off[ids[i]], pl = t->piece_off[ids[i] + 1] - po;
        memcpy(b + bl, t->piece + po, pl);
        bl += pl;
    }
    size_t ol = lossy(b, bl, o, 0, &held);
    *len = ol;
    int rc = SB_OK;
    if (ol + 1 > cap) {
        snprintf(err, errlen, "the text is %zu bytes, more than the buffer's %zu (with its NUL)", ol, cap);
        rc = SB_ERR_ARG;
    } else {
        memcpy(out, o, ol);
        out[ol] = 0;
    }
    free(b);
    free(o);
    return rc;
}

/* Streaming: the text of each new token, valid UTF-8, an incomplete character held back until the
 * token that completes it (or the flush) arrives; no token is decoded twice. */
struct sb_stream {
    const sb_tokenizer *t;
    uint8_t held[4];
    size_t n_held;
    uint8_t *in, *out; /* scratch, grown as pieces need */
    size_t cap;
};

int sb_stream_new(const sb_tokenizer *t, sb_stream **out, char *err, size_t errlen) {
    *out = calloc(1, sizeof **out);
    if (!*out) {
        snprintf(err, errlen, "out of memory");
        return SB_ERR_NOMEM;
    }
    (*out)->t = t;
    return SB_OK;
}

void sb_stream_free(sb_stream *s) {
    if (!s) return;
    free(s->in);
    free(s->out);
    free(s);
}

int sb_stream_push(sb_stream *s, int32_t id, const char **text, size_t *len, char *err, size_t errlen) {
    *text = "", *len = 0;
    const char *p;
    size_t pl;
    if (sb_token_piece(s->t, id, &p, &pl)) {
        snprintf(err, errlen, "token %d is outside the vocabulary of %d tokens", id, s->t->n_vocab);
        return SB_ERR_ARG;
    }
    size_t need = pl + s->n_held + 1;
    if (need > s->cap) {
        uint8_t *in = realloc(s->in, need), *o;
        if (in) s->in = in;
        o = in ? realloc(s->out, 3 * need) : NULL;
        if (!o) {
            snprintf(err, errlen, "out of memory");
            return SB_ERR_NOMEM;
        }
        s->out = o;
        s->cap = need;
    }
    memcpy(s->in, s->held, s->n_held);
    memcpy(s->in + s->n_held, p, pl);
    size_t n = s->n_held + pl, held;
    *len = lossy(s->in, n, s->out, 1, &held);
    memcpy(s->held, s->in + n - held, held);
    s->n_held = held;
    *text = (const char *)s->out;
    return SB_OK;
}

size_t sb_stream_flush(sb_stream *s, char *out4) {
    uint8_t o[12];
    size_t held, l = lossy(s->held, s->n_held, o, 0, &held);
    s->n_held = 0;
    memcpy(out4, o, l); /* an incomplete sequence is one U+FFFD: 3 bytes */
    return l;
}
