/* sparsamba engine: the plain C ABI of libsparsamba, the library an app links and Python loads
 * (ctypes); the standalone program sparsamba-run is built from the same core.
 *
 * A model is a packed GGUF (docs/packed-format.md), mapped read-only and validated completely
 * at load; a state holds one sequence's recurrent state (conv window and SSM state per layer).
 * Every function that can fail returns 0 on success and a nonzero SB_ERR_* code on failure, with
 * a one-line message in the caller's buffer (what was wrong, where). Nothing here aborts. */
#ifndef SPARSAMBA_H
#define SPARSAMBA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The version of this header, which is the package's (pyproject.toml: CMake refuses to configure when
 * the two differ). SB_ABI_VERSION counts incompatible changes of this ABI (a struct's layout, a
 * function's signature or meaning, a function removed) and is the library's SONAME,
 * libsparsamba.so.<SB_ABI_VERSION>; adding a function bumps the minor version only. */
#define SB_VERSION_MAJOR 0
#define SB_VERSION_MINOR 1
#define SB_VERSION_PATCH 0
#define SB_ABI_VERSION 0

/* The library exports these functions and nothing else (it is built with hidden visibility). */
#if defined(_WIN32)
#define SB_API __declspec(dllexport)
#else
#define SB_API __attribute__((visibility("default")))
#endif

enum {
    SB_OK = 0,
    SB_ERR_IO = 1,      /* cannot open / map / read the file */
    SB_ERR_FORMAT = 2,  /* not a valid packed GGUF: magic, version, offsets, shapes, types, codes */
    SB_ERR_NOMEM = 3,   /* an allocation failed (model too large for memory) */
    SB_ERR_ARG = 4,     /* a bad argument: token outside the vocabulary, empty input, n <= 0 */
    SB_ERR_DEVICE = 5,  /* a backend cannot run: no OpenCL library, platform or device, a kernel build */
};

/* Which kernels run: SB_ISA_AUTO picks the best the CPU has; the others force one (tests). AVX-512
 * (F/BW/VL) uses VNNI for int8 where the CPU has it (SPARSAMBA_NO_VNNI=1 forces vpmaddwd). 4 was the
 * retired neon-fp16 family (packed format v1). */
enum { SB_ISA_AUTO = 0, SB_ISA_SCALAR = 1, SB_ISA_AVX2 = 2, SB_ISA_NEON = 3, SB_ISA_AVX512 = 5 };

/* The library's version, "MAJOR.MINOR.PATCH" (static storage), and its ABI number. */
SB_API const char *sb_version(void);
SB_API int32_t sb_abi_version(void);
/* Whether the library loaded at run time serves the header the caller was compiled against: the same
 * ABI, and a version at least the header's major.minor (older libraries lack functions added since).
 * SB_ERR_ARG with a line naming both otherwise. Call it through SB_CHECK_VERSION first thing. */
SB_API int sb_check_version(int32_t abi, int32_t major, int32_t minor, char *err, size_t errlen);
#define SB_CHECK_VERSION(err, errlen) sb_check_version(SB_ABI_VERSION, SB_VERSION_MAJOR, SB_VERSION_MINOR, err, errlen)

typedef struct sb_model sb_model;
typedef struct sb_state sb_state;

typedef struct {
    int32_t vocab_size, d_model, n_layer, d_inner, d_state, dt_rank, d_conv;
    int32_t dtype;          /* 0 f32, 1 f16, 24 int8: the packed matrices' type */
    int32_t tied_head;      /* 1: the head is the embedding */
    int32_t norm_folded;
    int32_t format_version;
    int64_t file_bytes;     /* size of the mapped file */
    int64_t weight_bytes;   /* bytes of matrix blobs read per decoded token (every layer and the head) */
} sb_info;

SB_API int sb_model_load(const char *path, sb_model **out, char *err, size_t errlen);
SB_API void sb_model_free(sb_model *m);
SB_API void sb_model_info(const sb_model *m, sb_info *out);
/* The model's architecture: 1 Mamba-1 (sparsamba.mamba), 2 Mamba-2 (sparsamba.mamba2, whose sb_info has
 * dt_rank 0); for Mamba-2 also its heads (head_dim = d_inner / n_head) and B/C groups, else 0 (either
 * pointer may be NULL). */
SB_API int32_t sb_model_arch(const sb_model *m, int32_t *n_head, int32_t *n_group);

SB_API int sb_state_new(const sb_model *m, sb_state **out, char *err, size_t errlen);
SB_API void sb_state_reset(sb_state *s);
SB_API void sb_state_free(sb_state *s);

/* Run tokens[0..n) through the model from the state it is in (a prompt at once: prefill when
 * n > 1, decode when n == 1), leaving the state after the last token. logits_mode: 0 none, 1 the
 * last position's (vocab_size floats), 2 every position's (n * vocab_size floats, row-major). */
SB_API int sb_forward(const sb_model *m, sb_state *s, const int32_t *tokens, int32_t n,
                      float *logits, int32_t logits_mode, char *err, size_t errlen);

/* Threads for the next calls (OpenMP); <= 0 means all cores, and more than 4 per core (or than
 * SB_MAX_THREADS) are not started: they would only wait on each other. Returns the count in effect. */
#define SB_MAX_THREADS 1024
SB_API int32_t sb_set_threads(int32_t n);
/* Force a kernel family; returns the one in effect (an unavailable ISA falls back to scalar). */
SB_API int32_t sb_set_isa(int32_t isa);
SB_API const char *sb_isa_name(void);

/* llama-bench's protocol, timed here to keep Python out of it: prefill n_prompt tokens from a
 * fresh state, then decode n_gen tokens (greedy would need logits; the tokens are fixed), reps
 * times. pp_ts / tg_ts receive tokens per second for each repetition. */
SB_API int sb_bench(const sb_model *m, int32_t n_prompt, int32_t n_gen, int32_t reps, double *pp_ts,
                    double *tg_ts, char *err, size_t errlen);

/* Memory read bandwidth for the roofline: the best of reps passes summing a fresh buffer of `bytes`
 * with the active kernels' widest loads (and their prefetch), on the current thread count; each
 * thread reads its share in 1 MiB segments, its rate the median segment's (time spent descheduled
 * on a busy machine is not read time), the pass's rate the sum of its threads'. Bytes per second,
 * or < 0 when the buffer cannot be allocated. */
SB_API double sb_read_bandwidth(int64_t bytes, int32_t reps);

/* Latency profiling (profile.c), for the latency tables of `sparsamba profile`: weights stay cold (spread
 * over a working set larger than the last-level cache), as a decode step reads them from memory.
 * sb_profile_linear: the median time of one decode product (reps calls, after a warm-up) of a synthetic
 * (out, in) layer whose rows all remove n = 0..3 weights per group of 4 (random valid codes), in dtype
 * 0 (f32), 1 (f16) or 24 (int8), with the active kernels and thread count.
 * sb_profile_model: the median time of each prunable product of a loaded model, seconds[4 * i + j] for
 * block i and j = ssm_in, ssm_x, ssm_dt, ssm_out; each of reps passes starts with the caches flushed. */
SB_API int sb_profile_linear(int32_t out, int32_t in, int32_t n, int32_t dtype, int32_t reps, double *seconds,
                             char *err, size_t errlen);
SB_API int sb_profile_model(const sb_model *m, int32_t reps, double *seconds, char *err, size_t errlen);
/* sb_profile_decode: where a decode step's time goes. A 4-token prompt, one untimed step, then n_tokens
 * timed steps (fixed tokens) on the current thread count, the team synced at the end of every stage
 * (that sync is the only overhead). Per stage, mean seconds per token into seconds[i * 10 + s] and the
 * bytes the stage's product reads into bytes[...] (0 for a stage without one), (n_layer + 1) * 10
 * doubles each: block i's stages s = norm, in_proj, conv, x_proj, activation prep, dt_proj, scan,
 * out_proj, (unused), (unused); row n_layer: final norm, -, -, -, -, -, -, -, embedding row, head.
 * A Mamba-2 leaves x_proj and dt_proj at 0; its prep is Δ (bias, softplus, clamp) and the gated norm.
 * *total: wall seconds per step, marks included. */
SB_API int sb_profile_decode(const sb_model *m, int32_t n_tokens, double *seconds, double *bytes, double *total,
                             char *err, size_t errlen);
/* the profiler keeps its working set between calls (not thread-safe); this frees it */
SB_API void sb_profile_release(void);

/* Compute backends: the model on a device, with one sequence's state. SB_BACKEND_CPU is the engine
 * above (sb_state + sb_forward); SB_BACKEND_OPENCL uploads the matrices once, in the file's packed
 * layout, to OpenCL device `device_index` (an index into sb_opencl_devices' list; -1: the first GPU,
 * else the first device). libOpenCL is opened at run time: without it (or without a platform, a
 * device, a kernel build) sb_backend_open fails with SB_ERR_DEVICE and a message, and the caller may
 * fall back to the CPU. The model must outlive the backend. */
enum { SB_BACKEND_CPU = 0, SB_BACKEND_OPENCL = 1 };
typedef struct sb_backend sb_backend;
SB_API int sb_backend_open(const sb_model *m, int32_t kind, int32_t device_index, sb_backend **out, char *err,
                           size_t errlen);
SB_API void sb_backend_free(sb_backend *b);
/* back to the empty state */
SB_API int sb_backend_reset(sb_backend *b, char *err, size_t errlen);
/* sb_forward's semantics (decode when n == 1, prefill otherwise; logits_mode 0 / 1 / 2) on the backend */
SB_API int sb_backend_forward(sb_backend *b, const int32_t *tokens, int32_t n, float *logits, int32_t logits_mode,
                              char *err, size_t errlen);
/* what runs: the CPU kernel family, or "OpenCL device i: name (platform, type, arithmetic)" */
SB_API const char *sb_backend_name(const sb_backend *b);
/* The OpenCL devices, one line each: "index\tplatform\tdevice\ttype\tversion\tfp16 (0/1)\tglobal memory
 * bytes\n" into out (truncated to outlen). SB_ERR_DEVICE with the reason when there are none. */
SB_API int sb_opencl_devices(char *out, size_t outlen, char *err, size_t errlen);


/* ---- Text: the model's byte-level BPE tokenizer (tokenizer.c) ----------------------------------
 * Read from the packed GGUF's tokenizer.ggml.* keys, and copied out of the mapping (it may outlive
 * the model). Ids are those of HF `tokenizers` for the tokenizer.json the keys came from. A GGUF
 * without the keys fails with SB_ERR_ARG, "this model has no tokenizer ...". */
typedef struct sb_tokenizer sb_tokenizer;
SB_API int sb_tokenizer_load(const sb_model *m, sb_tokenizer **out, char *err, size_t errlen);
SB_API void sb_tokenizer_free(sb_tokenizer *t);
SB_API int32_t sb_tokenizer_n_vocab(const sb_tokenizer *t);
/* the file's BOS / EOS ids, -1 when it names none (sb_tokenize adds neither, as tokenizers does
 * for these models) */
SB_API int32_t sb_token_bos(const sb_tokenizer *t);
SB_API int32_t sb_token_eos(const sb_tokenizer *t);
/* text[0..len) -> ids[0..*n). Invalid UTF-8 is read as tokenizers receives it from a lossy decode
 * (each invalid sequence one U+FFFD). *n is the full count even when it exceeds cap, which then
 * fails with SB_ERR_ARG (cap = 6 * len + 1 always suffices). */
SB_API int sb_tokenize(const sb_tokenizer *t, const char *text, size_t len, int32_t *ids, int32_t cap, int32_t *n,
                       char *err, size_t errlen);
/* ids -> text (valid UTF-8, NUL-terminated; special and unused ids give nothing, as tokenizers'
 * decode(skip_special_tokens=True)). *len is the text's length even when out (cap bytes with the
 * NUL) is too small, which fails with SB_ERR_ARG (3 x the pieces' bytes + 1 always suffices). */
SB_API int sb_detokenize(const sb_tokenizer *t, const int32_t *ids, int32_t n, char *out, size_t cap, size_t *len,
                         char *err, size_t errlen);
/* the raw bytes a token stands for (possibly part of a UTF-8 character); valid while t lives.
 * SB_ERR_ARG (and no bytes) for an id outside the vocabulary. */
SB_API int sb_token_piece(const sb_tokenizer *t, int32_t id, const char **bytes, size_t *len);
/* Streaming decode: each token's text as it comes, never decoding earlier tokens again; an
 * incomplete UTF-8 character is held back until the token completing it. push's text is valid
 * until the next call; flush writes what is held (at most 4 bytes: one U+FFFD) into out4. */
typedef struct sb_stream sb_stream;
SB_API int sb_stream_new(const sb_tokenizer *t, sb_stream **out, char *err, size_t errlen);
SB_API int sb_stream_push(sb_stream *s, int32_t id, const char **text, size_t *len, char *err, size_t errlen);
SB_API size_t sb_stream_flush(sb_stream *s, char *out4);
SB_API void sb_stream_free(sb_stream *s);

/* ---- Generation (generate.c) --------------------------------------------------------------------
 * A prompt through a backend from its empty state, then up to n_predict new tokens. Each token's
 * logits are divided by temperature, cut to the top_k largest, softmaxed, cut to the smallest
 * most-likely set whose probability reaches top_p (HF transformers' order), and sampled with
 * splitmix64(seed); temperature 0 is greedy (argmax, the lowest id on a tie). */
typedef struct {
    int32_t n_predict;  /* new tokens at most, > 0 */
    float temperature;  /* >= 0; 0 = greedy */
    int32_t top_k;      /* >= 0; 0 = every token */
    float top_p;        /* in (0, 1]; 1 = every token */
    uint64_t seed;
    int32_t stop_at_eos; /* stop after the tokenizer's EOS id (it is passed to on_token, with no text) */
    const char *stop;   /* stop after the token whose text completes this string (NULL or "": none) */
} sb_gen_params;

enum { SB_STOP_LENGTH = 0, SB_STOP_EOS = 1, SB_STOP_STRING = 2, SB_STOP_CALLBACK = 3 };
typedef struct {
    int32_t n_prompt, n_gen;
    double prompt_s, gen_s; /* seconds in the prefill, and in decoding + sampling the new tokens */
    int32_t stop_reason;    /* SB_STOP_* */
} sb_gen_stats;

/* Each new token: its id and the text it completes (valid UTF-8; empty while a character is
 * incomplete, or without a tokenizer); a last call with id -1 brings any held-back bytes. A nonzero
 * return stops the generation. */
typedef int (*sb_token_fn)(int32_t id, const char *text, size_t len, void *user);

SB_API void sb_gen_defaults(sb_gen_params *p); /* 16 tokens, greedy, top_k 0, top_p 1, seed 0, stop at EOS */
/* t may be NULL (ids only: no text, no EOS, no stop string); out (n_predict ids) and stats may be NULL */
SB_API int sb_generate(sb_backend *b, const sb_tokenizer *t, const int32_t *prompt, int32_t n_prompt,
                       const sb_gen_params *p, sb_token_fn on_token, void *user, int32_t *out, sb_gen_stats *stats,
                       char *err, size_t errlen);
/* the model a backend runs */
SB_API const sb_model *sb_backend_model(const sb_backend *b);

#ifdef __cplusplus
}
#endif
#endif
