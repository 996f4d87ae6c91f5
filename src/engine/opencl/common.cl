/* Shared by every kernel file (prepended once to the program). The build options name the model's
 * weight storage type (SB_W_F32 / SB_W_F16 / SB_W_I8, one per program), the work-group size SB_LS
 * of the reducing kernels (a power of two), and SB_HALF_MATH when the device has cl_khr_fp16 and the
 * model is f16: then weight x activation products run in half. Without the extension (PoCL, Mesa)
 * everything computes in float and f16 weights are only *stored* as half (vload_half is core). */
#ifdef SB_TEST_BUILD_ERROR
#error "SB_TEST_BUILD_ERROR: a deliberate build failure (tests of the build-log error path)"
#endif

#ifdef SB_HALF_MATH
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
typedef half real; /* the compute type of a weight x activation product */
#else
typedef float real;
#endif

#if defined(SB_W_F16)
typedef half wstore;
#ifdef SB_HALF_MATH
#define LOADW(p, i) ((p)[i])
#else
#define LOADW(p, i) vload_half((i), (p))
#endif
#elif defined(SB_W_I8)
typedef char wstore; /* q in [-127, 127]; the row scale is applied to the finished dot product */
#define LOADW(p, i) ((real)(p)[i])
#else
typedef float wstore;
#define LOADW(p, i) ((p)[i])
#endif

/* one product, accumulated in float whatever the compute type */
#define MUL(w, x) ((float)((real)(w) * (real)(x)))

float sb_silu(float v) { return v / (1.0f + exp(-v)); }
float sb_softplus(float v) { return v > 20.0f ? v : log1p(exp(v)); } /* torch's threshold */
