# Sets up a CUDA 13.0 toolchain from PyPI wheels, for building lorahost's `cuda` feature on a
# machine without a GPU (or without a CUDA install), and exports the variables the build needs.
#
#   source scripts/cuda-env.sh        # compiler, runtime, cuBLAS and a link-only libcuda stub
#   source scripts/cuda-env.sh ptx    # only what `nvcc -ptx` needs (CI's kernel compile check)
#
# Everything goes under $LORAHOST_CUDA_PREFIX (default: .cuda/ in the repository, git-ignored) and
# is installed once. Versions are pinned to 13.0: cudarc 0.19 knows no newer toolkit, and PTX from
# a newer nvcc does not load on driver 580 (CUDA 13.0).
#
# The stub `libcuda.so.1` (every driver entry point returns CUDA_ERROR_NO_DEVICE) exists only so the
# linker can resolve cudarc's driver symbols here; it lives in its own folder, is put on the link
# path only, and must never reach a GPU machine, whose driver provides the real one.

lorahost_cuda_setup() {
  local root prefix cu mode="${1:-full}"
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  prefix="${LORAHOST_CUDA_PREFIX:-$root/.cuda}"
  cu="$prefix/nvidia/cu13"

  local wheels=(nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85)
  if [ "$mode" != ptx ]; then
    wheels+=(nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14)
  fi
  # One tree for both modes (pip --target replaces the shared nvidia/ folder on every install), so
  # a full install, a superset, also serves `ptx`.
  local stamp="$prefix/.installed-$mode"
  if [ ! -f "$stamp" ] && [ ! -f "$prefix/.installed-full" ]; then
    echo "cuda-env: installing ${#wheels[@]} CUDA 13.0 wheels into $prefix" >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --upgrade \
      --target "$prefix" "${wheels[@]}" || return 1
    # The wheels ship versioned sonames only; the linker looks for the plain names.
    local lib
    for lib in cudart.so.13 nvrtc.so.13 curand.so.10 cublas.so.13 cublasLt.so.13; do
      [ -e "$cu/lib/lib$lib" ] && ln -sf "lib$lib" "$cu/lib/lib${lib%%.so*}.so"
    done
    touch "$stamp"
  fi

  if [ "$mode" != ptx ] && [ ! -f "$prefix/stub/libcuda.so.1" ]; then
    lorahost_cuda_stub "$root" "$prefix/stub" || return 1
  fi

  export CUDA_HOME="$cu" CUDA_PATH="$cu"
  export PATH="$cu/bin:$PATH"
  export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}" CUDARC_CUDA_VERSION=13000
  if [ "$mode" != ptx ]; then
    export LIBRARY_PATH="$prefix/stub:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
    # For running cuda builds here (they then report that there is no device).
    export LORAHOST_CUDA_LD_LIBRARY_PATH="$cu/lib:$prefix/stub"
  fi
}

# Builds the link-only driver stub from the entry points of cudarc's driver bindings.
lorahost_cuda_stub() {
  local root="$1" out="$2" src
  (cd "$root" && cargo fetch --quiet) || return 1
  src="$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs 2>/dev/null | tail -1)"
  if [ -z "$src" ]; then
    echo "cuda-env: cudarc 0.19 sources not found in the cargo registry" >&2
    return 1
  fi
  mkdir -p "$out"
  grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$src" | awk '{print "int " $4 "(void) { return 100; }"}' \
    | sort -u > "$out/stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1" "$out/stub.c" || return 1
  ln -sf libcuda.so.1 "$out/libcuda.so"
}

lorahost_cuda_setup "$@"
