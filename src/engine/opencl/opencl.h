/* The OpenCL backend (opencl.c, compiled when the CL headers are found): the packed model's
 * matrices uploaded once in the file's layout, one sequence's state on the device, and the same
 * forward as forward.c's sb_forward. libOpenCL is opened with dlopen at run time, so the engine has
 * no link-time dependency on it: a machine without OpenCL gets an error, not a missing library. */
#ifndef SB_OPENCL_H
#define SB_OPENCL_H

#include <stddef.h>
#include <stdint.h>

#include "engine.h"

typedef struct sb_ocl sb_ocl;

int sb_ocl_open(const sb_model *m, int device_index, sb_ocl **out, char *err, size_t errlen);
void sb_ocl_free(sb_ocl *b);
int sb_ocl_reset(sb_ocl *b, char *err, size_t errlen);
/* arguments already checked by the caller (backend.c) */
int sb_ocl_forward(sb_ocl *b, const int32_t *tokens, int n, float *logits, int mode, char *err, size_t errlen);
const char *sb_ocl_name(const sb_ocl *b);
int sb_ocl_devices(char *out, size_t outlen, char *err, size_t errlen);

#endif
