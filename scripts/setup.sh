#!/usr/bin/env bash
# Set up cryolatent from nothing in ./.venv (Python >= 3.10).
#
#   bash scripts/setup.sh          # the package and its dependencies
#   bash scripts/setup.sh --test   # also the test tools and RELION 3.1 (Debian) in ./.relion,
#                                  # with .venv/bin/relion_* wrappers that set LD_LIBRARY_PATH
#                                  # (scripts/relion_wrappers.sh; not when another RELION is
#                                  # on the PATH already), and Debian's chromium +
#                                  # chromium-driver for the report's browser tests (when
#                                  # apt-get can install them; the tests skip without)
#
# torch is installed first and on purpose, so pip never resolves it on its own:
#   - a machine with an NVIDIA driver (nvidia-smi) gets PyPI's default (CUDA) build;
#   - a CPU-only machine gets a CPU build: torch==2.13.0 from a local wheel when pip's
#     find-links offer one (as on the project's build machines), else PyTorch's CPU index.
# Set CRYOLATENT_TORCH="torch==X.Y.Z ..." (pip arguments) to choose yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$VPY" -c "import torch" 2>/dev/null; then
  if [ -n "${CRYOLATENT_TORCH:-}" ]; then
    # shellcheck disable=SC2086
    pipi $CRYOLATENT_TORCH
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pipi "torch>=2.4"
  else
    local_cpu=""
    for d in $("$VPY" -m pip config list 2>/dev/null | sed -n "s/.*find-links='\(.*\)'/\1/p"); do
      ls "$d"/torch-2.13.0*cpu*.whl >/dev/null 2>&1 && local_cpu=1
    done
    if [ -n "$local_cpu" ]; then
      pipi "torch==2.13.0"
    else
      pipi torch --index-url https://download.pytorch.org/whl/cpu
    fi
  fi
fi

if [ $want_test = 1 ]; then
  pipi -e ".[test]"
  # RELION 3.1 from Debian, unpacked (no root install needed) into ./.relion
  if [ ! -x .relion/usr/bin/relion_star_handler ]; then
    tmp=$(mktemp -d)
    ( cd "$tmp" && { apt-get download relion libfftw3-double3 libfftw3-single3 >/dev/null 2>&1 \
        || { apt-get update >/dev/null 2>&1; apt-get download relion libfftw3-double3 libfftw3-single3 >/dev/null; }; } )
    mkdir -p .relion
    for f in "$tmp"/*.deb; do dpkg -x "$f" .relion; done
    rm -rf "$tmp"
  fi
  LD_LIBRARY_PATH="$PWD/.relion/usr/lib/x86_64-linux-gnu:$PWD/.relion/usr/lib" \
    .relion/usr/bin/relion_star_handler --version >/dev/null 2>&1 || true
  if [ -x .relion/usr/bin/relion_stack_create ]; then
    echo "RELION 3.1 in .relion/usr/bin"
    # on the venv's PATH, unless the user has a RELION of their own there (never shadow it)
    venv_bin="$PWD/.venv/bin"
    other=$(PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$venv_bin" | paste -sd: -) \
      command -v relion_stack_create 2>/dev/null || true)
    if [ -n "$other" ] && ! grep -q "scripts/relion_wrappers.sh" "$other" 2>/dev/null; then
      echo "RELION already on the PATH ($other): no relion_* wrappers in .venv/bin"
    else
      bash scripts/relion_wrappers.sh .relion/usr "$venv_bin"
    fi
  fi
  # headless Chromium for the report's browser tests (tests/test_report.py): Debian's
  # chromium + chromium-driver (Selenium drives that binary; no browser is downloaded) and
  # Mesa's llvmpipe for WebGL. Needs root and apt; never fatal: the tests skip without it.
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_pkgs="chromium chromium-driver libegl-mesa0 libgl1-mesa-dri"
    sudo_=""
    if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      sudo_="sudo -n"
    fi
    if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$sudo_" ]; }; then
      export DEBIAN_FRONTEND=noninteractive
      # shellcheck disable=SC2086
      { $sudo_ apt-get install -y -q $apt_pkgs >/dev/null 2>&1 \
        || { $sudo_ apt-get update -q >/dev/null 2>&1 && $sudo_ apt-get install -y -q $apt_pkgs >/dev/null 2>&1; }; } \
        && echo "chromium + chromedriver installed (report browser tests)" \
        || echo "note: could not install chromium (apt-get); the report's browser tests will skip"
    else
      echo "note: no chromium and no root apt-get; the report's browser tests will skip"
    fi
  fi
else
  pipi -e .
fi
"$VPY" -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'cpu')"
echo "cryolatent ready: .venv/bin/cryolatent"
