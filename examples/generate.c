/* The smallest app on libsparsamba: load a packed model, tokenize a prompt with the model's own
 * tokenizer, continue it greedily while streaming the text, free everything.
 *
 *   cc generate.c -o generate $(pkg-config --cflags --libs sparsamba)
 *   ./generate model.gguf "In the beginning" 32
 *
 * Prints the prompt and its continuation (stops at the end-of-text token or after N tokens, default
 * 32); exit status 1 with one line on stderr on any error. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sparsamba.h"

/* each new token's text as it comes (empty while a UTF-8 character is incomplete) */
static int print_text(int32_t id, const char *text, size_t len, void *user) {
    (void)id;
    (void)user;
    fwrite(text, 1, len, stdout);
    fflush(stdout);
    return 0; /* nonzero would stop the generation */
}

int main(int argc, char **argv) {
    char err[512];
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPT [N]\n", argv[0]);
        return 1;
    }
    /* the header this was compiled against must match the library loaded at run time */
    if (SB_CHECK_VERSION(err, sizeof err)) {
        fprintf(stderr, "generate: error: %s\n", err);
        return 1;
    }
    char *end;
    long n_predict = argc == 4 ? strtol(argv[3], &end, 10) : 32;
    if (argc == 4 && (*end || end == argv[3] || n_predict <= 0 || n_predict > 1 << 20)) {
        fprintf(stderr, "generate: error: N must be a whole number from 1 to %d (got '%s')\n", 1 << 20, argv[3]);
        return 1;
    }

    sb_model *model = NULL;
    sb_tokenizer *tok = NULL;
    sb_backend *backend = NULL;
    int32_t *ids = NULL, n_ids = 0;
    int rc = 1;
    size_t len = strlen(argv[2]);
    /* one id per byte at most for these byte-level tokenizers; sb_tokenize fails (and says how
     * many it needs in n_ids) when not */
    int32_t cap = (int32_t)len + 1;
    if (sb_model_load(argv[1], &model, err, sizeof err) || sb_tokenizer_load(model, &tok, err, sizeof err) ||
        sb_backend_open(model, SB_BACKEND_CPU, 0, &backend, err, sizeof err))
        goto out;
    if (!(ids = malloc(sizeof *ids * (size_t)cap))) {
        snprintf(err, sizeof err, "out of memory");
        goto out;
    }
    if (sb_tokenize(tok, argv[2], len, ids, cap, &n_ids, err, sizeof err)) goto out;
    if (n_ids == 0) {
        snprintf(err, sizeof err, "the prompt is empty");
        goto out;
    }

    sb_gen_params params;
    sb_gen_defaults(&params); /* greedy, stop at the end-of-text token */
    params.n_predict = (int32_t)n_predict;
    fputs(argv[2], stdout);
    if (sb_generate(backend, tok, ids, n_ids, &params, print_text, NULL, NULL, NULL, err, sizeof err)) goto out;
    putchar('\n');
    rc = 0;
out:
    if (rc) fprintf(stderr, "generate: error: %s\n", err);
    free(ids);
    sb_backend_free(backend); /* each free accepts NULL */
    sb_tokenizer_free(tok);
    sb_model_free(model);
    return rc;
}
