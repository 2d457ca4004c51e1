#!/usr/bin/env bash
# Side-by-side benchmarks vs agentlightning 0.3.0 (store+runner throughput, gateway overhead) and
# vs TRL (GRPO update tokens/s); prints each one's RATIO lines at the end.
# Needs .venv (bash scripts/test.sh makes it) and, for the agentlightning sides, .venv-agl, which
# scripts/setup_agl.sh builds (run below; once, about a minute).
# Usage: bash bench/run_all.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
bash scripts/setup_agl.sh || echo "note: .venv-agl could not be built; the agentlightning sides are skipped" >&2
export LITELLM_LOCAL_MODEL_COST_MAP=True HF_HUB_OFFLINE=1
QUICK=0; [[ "${1:-}" == "--quick" ]] && QUICK=1
LOG=$(mktemp -d)/bench
mkdir -p "$(dirname "$LOG")"
status=0

run() {  # name, command...
  local name=$1; shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$LOG.$name" || status=1
}

if [[ $QUICK == 1 ]]; then
  run store $PY bench/bench_store_throughput.py --rounds 1
  run gateway $PY bench/bench_gateway_overhead.py --requests 300
  run grpo $PY bench/bench_grpo.py --steps 2
else
  run store $PY bench/bench_store_throughput.py --rounds 3
  run gateway $PY bench/bench_gateway_overhead.py --requests 1000
  run grpo $PY bench/bench_grpo.py --steps 3
fi

echo
echo "=== ratios"
grep -h -E "^RATIO|speed-up" "$LOG".store "$LOG".gateway "$LOG".grpo 2>/dev/null
exit $status
