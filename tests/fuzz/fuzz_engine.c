/* libFuzzer target: the engine's loader and forward pass on arbitrary bytes.
 *
 * Each input is written to an anonymous in-memory file and loaded through the public C ABI, exactly
 * as a model file on disk would be (sb_model_load maps it). A file that loads is then run: a
 * prefill of a few tokens (two chunks' worth of code paths) and one decode step, with logits. Every
 * failure must come back as an error code; AddressSanitizer and UBSan turn any invalid access into
 * a crash that libFuzzer reports. The tokenizer, which reads untrusted keys too, is loaded and runs
 * a text (the input's last bytes, any bytes) through encode, decode and the streaming decoder.
 * Seeds: small compiled models (tests/test_fuzz.py makes them). */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "sparsamba.h"

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    sb_set_threads(1); /* deterministic, and no OpenMP pool for the sanitizers to trace */
    sb_set_isa(SB_ISA_SCALAR); /* the v2 reference kernels, instrumented (the SIMD ones are built plain) */
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    int fd = memfd_create("sparsamba-fuzz", MFD_CLOEXEC);
    if (fd < 0) return 0;
    if (size && write(fd, data, size) != (ssize_t)size) {
        close(fd);
        return 0;
    }
    char path[64], err[512];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    sb_model *m = NULL;
    if (sb_model_load(path, &m, err, sizeof err) == SB_OK) {
        sb_info info;
        sb_model_info(m, &info);
        sb_state *s = NULL;
        if (info.vocab_size > 0 && sb_state_new(m, &s, err, sizeof err) == SB_OK) {
            int32_t toks[5];
            for (int i = 0; i < 5; i++) toks[i] = (int32_t)((i * 7 + 1) % info.vocab_size);
            float *logits = malloc(sizeof(float) * (size_t)info.vocab_size);
            if (logits) {
                sb_forward(m, s, toks, 4, logits, 1 /* the last position's logits */, err, sizeof err);
                sb_forward(m, s, toks + 4, 1, logits, 1 /* the last position's logits */, err, sizeof err);
            }
            free(logits);
            sb_state_free(s);
        }
        sb_tokenizer *t = NULL;
        if (sb_tokenizer_load(m, &t, err, sizeof err) == SB_OK) {
            size_t len = size < 48 ? size : 48;
            const char *text = (const char *)data + size - len;
            int32_t ids[6 * 48 + 1], n = 0;
            if (sb_tokenize(t, text, len, ids, 6 * 48 + 1, &n, err, sizeof err) == SB_OK) {
                size_t out_len = 0;
                char *out = malloc(1);
                if (out && sb_detokenize(t, ids, n, out, 1, &out_len, err, sizeof err) == SB_ERR_ARG) {
                    char *grown = realloc(out, out_len + 1);
                    if (grown) sb_detokenize(t, ids, n, out = grown, out_len + 1, &out_len, err, sizeof err);
                }
                free(out);
                sb_stream *st = NULL;
                if (sb_stream_new(t, &st, err, sizeof err) == SB_OK) {
                    const char *piece;
                    size_t pl;
                    char rest[4];
                    for (int32_t i = 0; i < n; i++) sb_stream_push(st, ids[i], &piece, &pl, err, sizeof err);
                    sb_stream_push(st, -5, &piece, &pl, err, sizeof err); /* an id outside the vocabulary */
                    sb_stream_flush(st, rest);
                    sb_stream_free(st);
                }
            }
            sb_tokenizer_free(t);
        }
        sb_model_free(m);
    }
    close(fd);
    return 0;
}
