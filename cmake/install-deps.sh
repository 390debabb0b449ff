#!/usr/bin/env bash
# Installs the Debian packages Hydra builds against, when any is missing (as root, or through sudo).
# Usage: cmake/install-deps.sh [--check]   (--check: only report what is missing)
set -euo pipefail

packages=(
  cmake g++ make pkg-config
  libopenmpi-dev openmpi-bin libhdf5-openmpi-dev
  libprotobuf-dev protobuf-compiler
  libboost-program-options-dev libgtest-dev libopenblas-dev libopenblas-openmp-dev
  libsentencepiece-dev
  gnuplot-nox
)

if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "install-deps: this is not a Debian-based system; install the equivalents of: ${packages[*]}" >&2
  echo "install-deps: then run cmake -S . -B build && cmake --build build" >&2
  exit 1
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "${1:-}" = "--check" ]; then
  echo "install-deps: missing: ${missing[*]}"
  exit 1
fi

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
  sudo=(sudo)
else
  echo "install-deps: missing Debian packages: ${missing[*]}" >&2
  echo "install-deps: I am not root and cannot use sudo. Ask an administrator to run:" >&2
  echo "  apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
