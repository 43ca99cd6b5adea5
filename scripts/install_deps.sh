#!/usr/bin/env bash
# Installs what the builds consume and is missing, from Debian (root or sudo):
#   g++ (C++17, OpenMP)    build-essential
#   MPI: mpicxx, mpi.h, libmpi, mpirun          libopenmpi-dev openmpi-bin
#   OpenBLAS: cblas.h and -l$BLAS_LIB           libopenblas-dev
#   with nvcc: cuobjdump, nvdisasm               PyPI nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
# Each dependency is probed the way the build uses it: a small program is compiled, linked and run
# with the same compiler, headers and libraries as the Makefile. A header alone proves nothing:
# Debian's reference BLAS (libblas-dev) also ships cblas.h, but not libopenblas.
#
#   scripts/install_deps.sh           probe, install what is missing, probe again
#   scripts/install_deps.sh --check   probe only; exit 1 naming what is missing
set -uo pipefail
BLAS_LIB=${BLAS_LIB:-openblas}  # the library the Makefile links (-l$BLAS_LIB)
check_only=0
[ "${1:-}" = "--check" ] && check_only=1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

probe_cxx() {  # C++17 with OpenMP (libgomp), as the CPU build compiles
    printf '#include <omp.h>\nint main() { int n = 0;\n#pragma omp parallel reduction(+ : n)\n  n += 1;\n'\
'  return n == omp_get_max_threads() ? 0 : 1; }\n' > "$tmp/cxx.cpp"
    g++ -std=c++17 -fopenmp "$tmp/cxx.cpp" -o "$tmp/cxx" 2>"$tmp/cxx.err" && "$tmp/cxx"
}
probe_mpi() {
    command -v mpicxx >/dev/null 2>&1 && command -v mpirun >/dev/null 2>&1 || return 1
    printf '#include <mpi.h>\nint main(int c, char** v) { MPI_Init(&c, &v); MPI_Finalize(); return 0; }\n' > "$tmp/mpi.cpp"
    # shellcheck disable=SC2046  # mpicxx prints word lists
    g++ -std=c++17 $(mpicxx --showme:compile) "$tmp/mpi.cpp" -o "$tmp/mpi" $(mpicxx --showme:link) 2>"$tmp/mpi.err"
}
probe_blas() {
    printf '#include <cblas.h>\nint main() { float a = 2, b = 3, c = 0;\n'\
'  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, 1, 1, 1, 1.f, &a, 1, &b, 1, 0.f, &c, 1);\n'\
'  return c == 6 ? 0 : 1; }\n' > "$tmp/blas.cpp"
    g++ -std=c++17 "$tmp/blas.cpp" -o "$tmp/blas" -l"$BLAS_LIB" 2>"$tmp/blas.err" && OPENBLAS_NUM_THREADS=1 "$tmp/blas"
}

missing() {  # prints the Debian packages whose probe fails
    local need=()
    probe_cxx || need+=(build-essential)
    probe_mpi || need+=(libopenmpi-dev openmpi-bin)
    probe_blas || need+=(libopenblas-dev)
    echo "${need[@]}"
}

# With nvcc, the static GPU checks (tests/gpu_static.sh) need cuobjdump and nvdisasm, which this
# toolkit lacks; PyPI has them. Only those checks need them, so a failure here is a warning.
have_cuobjdump() {
    command -v cuobjdump >/dev/null || python3 -c 'import nvidia, os, sys
sys.exit(not os.path.exists(os.path.join(list(nvidia.__path__)[0], "cu13", "bin", "cuobjdump")))' 2>/dev/null
}
if command -v nvcc >/dev/null && ! have_cuobjdump; then
    if [ $check_only = 1 ]; then echo "install_deps: nvcc without cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)" >&2
    else
        echo "installing cuobjdump and nvdisasm from PyPI"
        python3 -m pip install -q nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >/dev/null 2>&1 ||
            echo "install_deps: warning: pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm failed" >&2
    fi
fi

need=$(missing)
if [ -z "$need" ]; then exit 0; fi
if [ $check_only = 1 ]; then
    echo "install_deps: missing: $need (probe errors: $(cat "$tmp"/*.err 2>/dev/null | grep -m1 -i error))" >&2
    exit 1
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing $need"
$sudo apt-get update -qq || { echo "install_deps: apt-get update failed" >&2; exit 1; }
# shellcheck disable=SC2086  # need is a word list
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $need >/dev/null ||
    { echo "install_deps: apt-get install $need failed" >&2; exit 1; }
still=$(missing)
if [ -n "$still" ]; then
    echo "install_deps: still missing after installing: $still ($(cat "$tmp"/*.err 2>/dev/null | grep -m1 -i error))" >&2
    exit 1
fi
