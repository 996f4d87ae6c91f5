# Cross-build for 64-bit ARM Linux with Debian's gcc-aarch64-linux-gnu; the result runs here under qemu.
#   apt-get install gcc-aarch64-linux-gnu qemu-user
#   cmake -S . -B build/arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake
#   cmake --build build/arm64 --target sparsamba-run sparsamba example-generate
#   qemu-aarch64 build/arm64/sparsamba-run -m model.gguf -p "In the beginning" -n 32
#   qemu-aarch64 -L /usr/aarch64-linux-gnu build/arm64/example-generate model.gguf "In the beginning"
# SPARSAMBA_STATIC is ON by default here: sparsamba-run is linked statically (glibc and libgomp included),
# so qemu needs no sysroot and the binary copies to any aarch64 Linux as one file. The library
# (libsparsamba.so.<ABI>) and the example linked against it are dynamic, as an app is: qemu's -L gives
# them the target's loader, libc and libgomp. With -DSPARSAMBA_STATIC=OFF sparsamba-run is dynamic too
# (what ctest runs through CMAKE_CROSSCOMPILING_EMULATOR below).
#
# Android: the same CMakeLists, with the NDK's toolchain file instead of this one (not built here: no NDK):
#   cmake -S . -B build/android -DCMAKE_TOOLCHAIN_FILE=$NDK/build/cmake/android.toolchain.cmake \
#         -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28
#   cmake --build build/android --target sparsamba-run sparsamba example-generate
#   adb push build/android/sparsamba-run model.gguf /data/local/tmp/
#   adb shell /data/local/tmp/sparsamba-run -m /data/local/tmp/model.gguf -p "In the beginning"
# libsparsamba.so is unversioned there (an APK carries only lib*.so files): an app puts it in
# jniLibs/arm64-v8a and includes sparsamba.h.
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
