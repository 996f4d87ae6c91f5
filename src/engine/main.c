/* sparsamba-run: the engine with no Python, the same core the Python package loads, for a phone or
 * a sanitizer build. Two modes:
 *   text:  -p "text" (or -f FILE) is tokenized with the model's own tokenizer, continued for -n
 *          tokens (greedy, or sampled with --temp / --top-k / --top-p / --seed), and the text is
 *          streamed to stdout; then prompt and generation speed and peak memory on stderr, as
 *          llama.cpp's CLI prints them.
 *   ids:   --tokens "ID ID ..." is continued greedily and the new ids printed. --logits writes the
 *          prompt's logits (T x V float32, little-endian: the engine's own order on every target we
 *          build for) so another machine's numbers can be compared.
 * Exit status 0 on success, 1 with one line on stderr otherwise. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "sparsamba.h"

static int usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [-m] MODEL.gguf (-p TEXT | -f FILE | --tokens \"ID ID ...\") [-n N] [-t THREADS]\n"
            "       [--temp T] [--top-k K] [--top-p P] [--seed S] [--stop TEXT] [--ignore-eos]\n"
            "       [--isa auto|scalar|avx2|avx512|neon] [--info] [--logits PATH]\n"
            "  -p / -f: continues the text for N tokens (default 16), streamed to stdout; greedy unless --temp > 0;\n"
            "           stops at the end-of-text token (unless --ignore-eos) or after the --stop text;\n"
            "           speed and peak memory on stderr\n"
            "  --tokens: continues the token ids greedily for N tokens and prints the new ids;\n"
            "  --logits writes every prompt position's logits to PATH as raw float32 (T x V)\n",
            argv0);
    return 2;
}

/* a whole number in [lo, hi], or a one-line error: atoi would read "3e9" as 3 and "x" as 0 */
static int int_arg(const char *name, const char *s, long lo, long hi, int *out) {
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "sparsamba-run: error: %s must be a whole number from %ld to %ld (got '%s')\n", name, lo, hi, s);
        return 0;
    }
    *out = (int)v;
    return 1;
}

/* a finite number in [lo, hi] */
static int float_arg(const char *name, const char *s, double lo, double hi, float *out) {
    char *end;
    double v = strtod(s, &end);
    if (end == s || *end || !(v >= lo && v <= hi)) {
        fprintf(stderr, "sparsamba-run: error: %s must be a number from %g to %g (got '%s')\n", name, lo, hi, s);
        return 0;
    }
    *out = (float)v;
    return 1;
}

/* the whole file, NUL-terminated, or NULL with a message */
static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, n = 0;
    if (!f) {
        fprintf(stderr, "sparsamba-run: error: cannot open the prompt file '%s'\n", path);
        return NULL;
    }
    for (;;) {
        if (n + 4096 + 1 > cap) {
            char *nb = realloc(buf, cap = 2 * cap + 8192);
            if (!nb) {
                fprintf(stderr, "sparsamba-run: error: the prompt file '%s' does not fit in memory\n", path);
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        size_t got = fread(buf + n, 1, 4096, f);
        n += got;
        if (got < 4096) break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        fprintf(stderr, "sparsamba-run: error: cannot read the prompt file '%s'\n", path);
        free(buf);
        return NULL;
    }
    buf[n] = 0;
    *len = n;
    return buf;
}

/* The offset of the first byte that is not part of valid UTF-8, or -1. The library reads such
 * bytes as tokenizers does after a lossy decode (U+FFFD), but a prompt typed with them is more
 * likely a wrong terminal encoding than intended, and `sparsamba run` refuses it too. */
static long utf8_invalid_at(const unsigned char *s, size_t n) {
    for (size_t i = 0; i < n;) {
        unsigned char b = s[i];
        size_t need = b < 0x80 ? 0 : b >= 0xC2 && b <= 0xDF ? 1 : b >= 0xE0 && b <= 0xEF ? 2 : b >= 0xF0 && b <= 0xF4 ? 3 : 9;
        if (need == 9 || (need && i + need >= n)) return (long)i;
        unsigned char lo = b == 0xE0 ? 0xA0 : b == 0xF0 ? 0x90 : 0x80, hi = b == 0xED ? 0x9F : b == 0xF4 ? 0x8F : 0xBF;
        for (size_t k = 1; k <= need; k++)
            if (s[i + k] < (k == 1 ? lo : 0x80) || s[i + k] > (k == 1 ? hi : 0xBF)) return (long)i;
        i += need + 1;
    }
    return -1;
}

static int print_piece(int32_t id, const char *text, size_t len, void *user) {
    (void)id;
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0;
}

static int run_text(sb_model *m, const char *prompt, size_t plen, const sb_gen_params *gp, int ignore_eos) {
    char err[1024];
    sb_tokenizer *tok = NULL;
    sb_backend *b = NULL;
    int32_t *ids = NULL, n_ids = 0;
    int rc = 1;
    int tr = sb_tokenizer_load(m, &tok, err, sizeof err);
    if (tr) {
        fprintf(stderr, "sparsamba-run: error: %s%s\n", err, tr == SB_ERR_ARG ? "; pass --tokens" : "");
        return 1;
    }
    long bad = utf8_invalid_at((const unsigned char *)prompt, plen);
    if (bad >= 0) {
        fprintf(stderr, "sparsamba-run: error: the prompt is not valid UTF-8 (byte 0x%02x at offset %ld); give UTF-8 text\n",
                (unsigned char)prompt[bad], bad);
        goto out;
    }
    /* at most one id per byte for valid UTF-8 without byte fallback; sb_tokenize says if not */
    size_t cap = plen + 1;
    if (cap > (size_t)INT32_MAX || !(ids = malloc(sizeof(int32_t) * cap))) {
        fprintf(stderr, "sparsamba-run: error: a %zu-byte prompt does not fit in memory\n", plen);
        goto out;
    }
    int r = sb_tokenize(tok, prompt, plen, ids, (int32_t)cap, &n_ids, err, sizeof err);
    if (r == SB_ERR_ARG && n_ids > (int32_t)cap) {
        int32_t *grown = realloc(ids, sizeof(int32_t) * (size_t)n_ids);
        r = grown ? sb_tokenize(tok, prompt, plen, ids = grown, n_ids, &n_ids, err, sizeof err) : SB_ERR_NOMEM;
    }
    if (r) {
        fprintf(stderr, "sparsamba-run: error: %s\n", r == SB_ERR_NOMEM ? "the prompt does not fit in memory" : err);
        goto out;
    }
    if (n_ids == 0) {
        fprintf(stderr, "sparsamba-run: error: the prompt is empty; give some text (or --tokens)\n");
        goto out;
    }
    if (sb_backend_open(m, SB_BACKEND_CPU, 0, &b, err, sizeof err)) {
        fprintf(stderr, "sparsamba-run: error: %s\n", err);
        goto out;
    }
    sb_gen_params p = *gp;
    p.stop_at_eos = !ignore_eos;
    sb_gen_stats st;
    fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    if (sb_generate(b, tok, ids, n_ids, &p, print_piece, NULL, NULL, &st, err, sizeof err)) {
        fprintf(stderr, "\nsparsamba-run: error: %s\n", err);
        goto out;
    }
    printf("\n");
    fflush(stdout);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    sb_info I;
    sb_model_info(m, &I);
    static const char *why[] = {"length", "end of text", "stop string", "callback"};
    fprintf(stderr, "sparsamba-run: prompt eval: %8.2f ms / %5d tokens (%8.2f ms per token, %9.2f tokens per second)\n",
            1e3 * st.prompt_s, st.n_prompt, 1e3 * st.prompt_s / st.n_prompt, st.n_prompt / (st.prompt_s > 0 ? st.prompt_s : 1e-9));
    fprintf(stderr, "sparsamba-run:        eval: %8.2f ms / %5d tokens (%8.2f ms per token, %9.2f tokens per second)\n",
            1e3 * st.gen_s, st.n_gen, 1e3 * st.gen_s / st.n_gen, st.n_gen / (st.gen_s > 0 ? st.gen_s : 1e-9));
    fprintf(stderr, "sparsamba-run: stopped at %s; peak RSS %.1f MiB (model file %.1f MiB); kernels %s\n",
            why[st.stop_reason], ru.ru_maxrss / 1024.0, I.file_bytes / 1048576.0, sb_isa_name());
    rc = 0;
out:
    sb_backend_free(b);
    free(ids);
    sb_tokenizer_free(tok);
    return rc;
}

int main(int argc, char **argv) {
    const char *path = NULL, *toks = "0", *isa = "auto", *logits_path = NULL, *text = NULL, *text_file = NULL;
    int n = 16, threads = 0, info = 0, ignore_eos = 0, top_k = 0, seed = 0;
    float temp = 0, top_p = 1;
    const char *stop = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc) toks = argv[++i];
        else if (!strcmp(argv[i], "-m") && i + 1 < argc && !path) path = argv[++i];
        else if (!strcmp(argv[i], "-p") && i + 1 < argc) text = argv[++i];
        else if (!strcmp(argv[i], "-f") && i + 1 < argc) text_file = argv[++i];
        else if (!strcmp(argv[i], "--stop") && i + 1 < argc) stop = argv[++i];
        else if (!strcmp(argv[i], "--ignore-eos")) ignore_eos = 1;
        else if (!strcmp(argv[i], "--temp") && i + 1 < argc) {
            if (!float_arg("--temp", argv[++i], 0, 1e6, &temp)) return 1;
        } else if (!strcmp(argv[i], "--top-p") && i + 1 < argc) {
            if (!float_arg("--top-p", argv[++i], 1e-9, 1, &top_p)) return 1;
        } else if (!strcmp(argv[i], "--top-k") && i + 1 < argc) {
            if (!int_arg("--top-k", argv[++i], 0, 0x7fffffff, &top_k)) return 1;
        } else if (!strcmp(argv[i], "--seed") && i + 1 < argc) {
            if (!int_arg("--seed", argv[++i], 0, 0x7fffffff, &seed)) return 1;
        } else if (!strcmp(argv[i], "-n") && i + 1 < argc) {
            if (!int_arg("-n", argv[++i], 1, 1L << 30, &n)) return 1;
        } else if (!strcmp(argv[i], "-t") && i + 1 < argc) {
            if (!int_arg("-t", argv[++i], 0, SB_MAX_THREADS, &threads)) return 1;
        }
        else if (!strcmp(argv[i], "--isa") && i + 1 < argc) isa = argv[++i];
        else if (!strcmp(argv[i], "--logits") && i + 1 < argc) logits_path = argv[++i];
        else if (!strcmp(argv[i], "--info")) info = 1;
        else if (argv[i][0] == '-' || path) return usage(argv[0]);
        else path = argv[i];
    }
    if (!path) return usage(argv[0]);
    if (text && text_file) {
        fprintf(stderr, "sparsamba-run: error: give the prompt as -p TEXT or -f FILE, not both\n");
        return 1;
    }
    sb_set_threads(threads);
    sb_set_isa(!strcmp(isa, "scalar") ? SB_ISA_SCALAR
               : !strcmp(isa, "avx2") ? SB_ISA_AVX2
               : !strcmp(isa, "avx512") ? SB_ISA_AVX512
               : !strcmp(isa, "neon") ? SB_ISA_NEON
                                      : SB_ISA_AUTO);
    char err[1024];
    sb_model *m;
    sb_state *s;
    if (sb_model_load(path, &m, err, sizeof err)) {
        fprintf(stderr, "sparsamba-run: error: %s\n", err);
        return 1;
    }
    sb_info I;
    sb_model_info(m, &I);
    if (text || text_file) {
        size_t plen = text ? strlen(text) : 0;
        char *buf = text_file ? read_file(text_file, &plen) : NULL;
        int rc = 1;
        if (text || buf) {
            sb_gen_params gp;
            sb_gen_defaults(&gp);
            gp.n_predict = n, gp.temperature = temp, gp.top_k = top_k, gp.top_p = top_p, gp.seed = (uint64_t)seed;
            gp.stop = stop;
            rc = run_text(m, text ? text : buf, plen, &gp, ignore_eos);
        }
        free(buf);
        sb_model_free(m);
        return rc;
    }
    if (info)
        printf("vocab %d d_model %d layers %d d_inner %d d_state %d dt_rank %d conv %d dtype %d tied %d kernels %s\n",
               I.vocab_size, I.d_model, I.n_layer, I.d_inner, I.d_state, I.dt_rank, I.d_conv, I.dtype, I.tied_head,
               sb_isa_name());
    int cap = (int)strlen(toks) / 2 + 2, count = 0;
    int32_t *prompt = malloc(sizeof(int32_t) * (size_t)cap);
    /* every prompt position's logits when they are written out, else the last one's */
    float *logits = malloc(sizeof(float) * (size_t)I.vocab_size * (logits_path ? (size_t)cap : 1));
    int rc = 1;
    if (!prompt || !logits || sb_state_new(m, &s, err, sizeof err)) {
        fprintf(stderr, "sparsamba-run: error: out of memory\n");
        goto out;
    }
    for (char *p = (char *)toks, *end; *p;) {
        long v = strtol(p, &end, 10);
        if (end == p) {
            if (*p == ' ' || *p == ',') { p++; continue; }
            fprintf(stderr, "sparsamba-run: error: --tokens: '%s' is not a list of integers\n", toks);
            goto out_state;
        }
        if (count < cap) prompt[count++] = (int32_t)(v < -1 ? -1 : v > 0x7fffffff ? 0x7fffffff : v);
        p = end;
    }
    if (sb_forward(m, s, prompt, count, logits, logits_path ? 2 : 1, err, sizeof err)) {
        fprintf(stderr, "sparsamba-run: error: %s\n", err);
        goto out_state;
    }
    if (logits_path) {
        FILE *f = fopen(logits_path, "wb");
        size_t want = (size_t)count * I.vocab_size;
        int bad = !f || fwrite(logits, sizeof(float), want, f) != want;
        if ((f && fclose(f)) || bad) {
            fprintf(stderr, "sparsamba-run: error: cannot write the logits to '%s'\n", logits_path);
            goto out_state;
        }
        memmove(logits, logits + (size_t)(count - 1) * I.vocab_size, sizeof(float) * (size_t)I.vocab_size);
    }
    for (int g = 0; g < n; g++) {
        int32_t best = 0;
        for (int v = 1; v < I.vocab_size; v++)
            if (logits[v] > logits[best]) best = v;
        printf("%d%c", best, g + 1 < n ? ' ' : '\n');
        if (g + 1 < n && sb_forward(m, s, &best, 1, logits, 1, err, sizeof err)) {
            fprintf(stderr, "sparsamba-run: error: %s\n", err);
            goto out_state;
        }
    }
    rc = 0;
out_state:
    sb_state_free(s);
out:
    free(prompt);
    free(logits);
    sb_model_free(m);
    return rc;
}
