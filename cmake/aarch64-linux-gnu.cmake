# Cross-build for 64-bit ARM Linux with Debian's gcc-aarch64-linux-gnu; the result runs here under qemu.
#   apt-get install gcc-aarch64-linux-gnu qemu-user
#   cmake -S . -B build/arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
#   cmake --build build/arm64 --target sparsamba-run
#   qemu-aarch64 build/arm64/sparsamba-run model.gguf --tokens "1 2 3" --info
# SPARSAMBA_STATIC is ON by default here: sparsamba-run is linked statically (glibc and libgomp included),
# so qemu needs no sysroot and the binary copies to any aarch64 Linux as one file. With
# -DSPARSAMBA_STATIC=OFF, run it as `qemu-aarch64 -L /usr/aarch64-linux-gnu ...` (what ctest does, through
# CMAKE_CROSSCOMPILING_EMULATOR below).
#
# Android: the same CMakeLists, with the NDK's toolchain file instead of this one (not this file):
#   cmake -S . -B build/android -DCMAKE_TOOLCHAIN_FILE=$NDK/build/cmake/android.toolchain.cmake \
#         -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28
#   cmake --build build/android --target sparsamba-run
#   adb push build/android/sparsamba-run model.gguf /data/local/tmp/
#   adb shell /data/local/tmp/sparsamba-run /data/local/tmp/model.gguf --tokens "1 2 3"
# CMAKE_SYSTEM_PROCESSOR is aarch64 there too, so the NEON kernels are compiled; the NDK's clang brings
# OpenMP as libomp (-DSPARSAMBA_OPENMP=OFF builds a single-threaded engine without it). Android links
# dynamically against its own libc (bionic): leave SPARSAMBA_STATIC OFF.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(SB_CROSS aarch64-linux-gnu)
set(CMAKE_C_COMPILER ${SB_CROSS}-gcc)
set(CMAKE_FIND_ROOT_PATH /usr/${SB_CROSS})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# ctest and try_run go through qemu; -L finds the target's dynamic loader and libraries (a static
# binary ignores it)
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 -L /usr/${SB_CROSS})
set(SPARSAMBA_STATIC ON CACHE BOOL "link sparsamba-run statically (libc and libgomp included)")
