/* Compute backends behind one handle (sparsamba.h: sb_backend_*): the CPU engine (an sb_state and
 * sb_forward) or the OpenCL backend (opencl.c, present when the build found the CL headers). Both
 * keep one sequence's state and take the same calls, so a caller can fall back from one to the other. */
#include <stdio.h>
#include <stdlib.h>

#include "engine.h"
#ifdef SB_HAVE_OPENCL
#include "opencl/opencl.h"
#endif

struct sb_backend {
    int kind;
    const sb_model *m;
    sb_state *st; /* SB_BACKEND_CPU */
#ifdef SB_HAVE_OPENCL
    sb_ocl *ocl; /* SB_BACKEND_OPENCL */
#endif
};

#ifndef SB_HAVE_OPENCL
static int no_opencl(char *err, size_t errlen) {
    snprintf(err, errlen,
             "OpenCL: this sparsamba was built without the OpenCL backend (CL/cl.h was not found at build time, or "
             "SPARSAMBA_OPENCL=OFF); install the OpenCL headers (Debian: opencl-c-headers) and reinstall");
    return SB_ERR_DEVICE;
}
#endif

int sb_opencl_devices(char *out, size_t outlen, char *err, size_t errlen) {
#ifdef SB_HAVE_OPENCL
    return sb_ocl_devices(out, outlen, err, errlen);
#else
    if (outlen) out[0] = 0;
    return no_opencl(err, errlen);
#endif
}

int sb_backend_open(const sb_model *m, int32_t kind, int32_t device_index, sb_backend **out, char *err,
                    size_t errlen) {
    *out = NULL;
    if (kind != SB_BACKEND_CPU && kind != SB_BACKEND_OPENCL) {
        snprintf(err, errlen, "unknown backend %d (SB_BACKEND_CPU = 0, SB_BACKEND_OPENCL = 1)", kind);
        return SB_ERR_ARG;
    }
#ifndef SB_HAVE_OPENCL
    if (kind == SB_BACKEND_OPENCL) return no_opencl(err, errlen);
#endif
    sb_backend *b = calloc(1, sizeof *b);
    if (!b) {
        snprintf(err, errlen, "out of memory");
        return SB_ERR_NOMEM;
    }
    b->kind = kind;
    b->m = m;
    int rc;
    if (kind == SB_BACKEND_CPU) {
        (void)device_index;
        rc = sb_state_new(m, &b->st, err, errlen);
    } else {
#ifdef SB_HAVE_OPENCL
        rc = sb_ocl_open(m, device_index, &b->ocl, err, errlen);
#else
        rc = SB_ERR_DEVICE;
#endif
    }
    if (rc) {
        free(b);
        return rc;
    }
    *out = b;
    return SB_OK;
}

void sb_backend_free(sb_backend *b) {
    if (!b) return;
    sb_state_free(b->st);
#ifdef SB_HAVE_OPENCL
    sb_ocl_free(b->ocl);
#endif
    free(b);
}

const char *sb_backend_name(const sb_backend *b) {
#ifdef SB_HAVE_OPENCL
    if (b->ocl) return sb_ocl_name(b->ocl);
#endif
    return sb_isa_name();
}

int sb_backend_reset(sb_backend *b, char *err, size_t errlen) {
    if (b->st) {
        sb_state_reset(b->st);
        return SB_OK;
    }
#ifdef SB_HAVE_OPENCL
    return sb_ocl_reset(b->ocl, err, errlen);
#else
    return no_opencl(err, errlen);
#endif
}

int sb_backend_forward(sb_backend *b, const int32_t *tokens, int32_t n, float *logits, int32_t mode, char *err,
                       size_t errlen) {
    if (b->st) return sb_forward(b->m, b->st, tokens, n, logits, mode, err, errlen);
    int rc = sb_check_forward(b->m, tokens, n, logits, mode, err, errlen);
    if (rc) return rc;
#ifdef SB_HAVE_OPENCL
    return sb_ocl_forward(b->ocl, tokens, n, logits, mode, err, errlen);
#else
    return no_opencl(err, errlen);
#endif
}

const sb_model *sb_backend_model(const sb_backend *b) { return b->m; }
