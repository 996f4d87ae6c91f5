/* sparsamba-run: the engine with no Python. Loads a packed GGUF and continues a prompt of token
 * ids greedily, printing the new ids; the same core the Python package loads, for a phone or a
 * sanitizer build. --logits writes the prompt's logits (T x V float32, little-endian: the engine's
 * own order on every target we build for) so another machine's numbers can be compared.
 * Exit status 0 on success, 1 with one line on stderr otherwise. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparsamba.h"

static int usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s MODEL.gguf [--tokens \"ID ID ...\"] [-n N] [-t THREADS] [--isa auto|scalar|avx2|avx512|neon] [--info]\n"
            "       [--logits PATH]\n"
            "  continues the prompt token ids greedily for N tokens (default 16) and prints the new ids;\n"
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

int main(int argc, char **argv) {
    const char *path = NULL, *toks = "0", *isa = "auto", *logits_path = NULL;
    int n = 16, threads = 0, info = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc) toks = argv[++i];
        else if (!strcmp(argv[i], "-n") && i + 1 < argc) {
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
