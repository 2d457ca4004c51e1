#!/usr/bin/env bash
# Creates .venv-agl: agentlightning 0.3.0, the baseline of bench/bench_store_throughput.py and
# bench/bench_gateway_overhead.py (bench/agl_store_throughput.py runs in it). Not needed by the tests.
# LiteLLM and OpenTelemetry are pinned to releases of agentlightning's time (Dec 2025): with the newest
# ones pip picks, its LLMProxy refuses to start without a master key and its OTLP exporter ignores the
# store endpoint agentlightning patches in (bench/RESULTS.md, "Setup").
# Re-runs only when this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=.venv-agl
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.kiln-installed
want=$(sha256sum scripts/setup_agl.sh | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export LITELLM_LOCAL_MODEL_COST_MAP=True  # no cost-map download at import
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "agentlightning==0.3.0"
"$VENV/bin/python" -m pip install -q "litellm[proxy]==1.80.10" \
  opentelemetry-api==1.39.1 opentelemetry-sdk==1.39.1 opentelemetry-exporter-otlp==1.39.1 \
  opentelemetry-exporter-otlp-proto-http==1.39.1 opentelemetry-exporter-otlp-proto-grpc==1.39.1 \
  opentelemetry-exporter-otlp-proto-common==1.39.1 opentelemetry-proto==1.39.1 \
  opentelemetry-semantic-conventions==0.60b1 opentelemetry-instrumentation==0.60b1
# Fail here, not in a benchmark round, if the baseline cannot import what the bench drives.
"$VENV/bin/python" -c "import agentlightning, litellm; from agentlightning.emitter.reward import emit_reward"
echo "$want" > "$stamp"
