#!/usr/bin/env bash
# Installs what the builds need and is missing: OpenMPI and OpenBLAS from Debian (root or sudo).
set -euo pipefail
need=()
command -v mpicxx >/dev/null 2>&1 || need+=(libopenmpi-dev openmpi-bin)
[ -e /usr/include/x86_64-linux-gnu/cblas.h ] || [ -e /usr/include/cblas.h ] || [ -e /usr/include/openblas/cblas.h ] || need+=(libopenblas-dev)
((${#need[@]})) || exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
