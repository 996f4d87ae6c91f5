/* The library's version and the run-time check of an app's header against it (sparsamba.h). */
#include <stdio.h>

#include "sparsamba.h"

#define SB_STR_(x) #x
#define SB_STR(x) SB_STR_(x)

const char *sb_version(void) {
    return SB_STR(SB_VERSION_MAJOR) "." SB_STR(SB_VERSION_MINOR) "." SB_STR(SB_VERSION_PATCH);
}

int32_t sb_abi_version(void) { return SB_ABI_VERSION; }

int sb_check_version(int32_t abi, int32_t major, int32_t minor, char *err, size_t errlen) {
    int older = SB_VERSION_MAJOR < major || (SB_VERSION_MAJOR == major && SB_VERSION_MINOR < minor);
    if (abi == SB_ABI_VERSION && !older) return SB_OK;
    if (err && errlen)
        snprintf(err, errlen,
                 "libsparsamba %s (ABI %d) cannot serve an app compiled against sparsamba.h %d.%d (ABI %d): %s",
                 sb_version(), SB_ABI_VERSION, (int)major, (int)minor, (int)abi,
                 abi != SB_ABI_VERSION ? "rebuild the app against this library's header"
                                       : "install a library at least as new as the header");
    return SB_ERR_ARG;
}
