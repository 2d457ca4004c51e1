#!/usr/bin/env bash
# Creates .venv-crewai: CrewAI + AgentKiln's runner, for examples/crewai_agent.py and its test.
# CrewAI pins openai<3 and openai-agents needs openai>=3, so CrewAI cannot live in .venv.
# Re-runs only when pyproject.toml or this script changes.
#
# Lean on purpose: the core install of AgentKiln is the client SDK and runner, without the server,
# engine and training stack (torch, transformers, peft, ...: the `serve` / `train` extras). An
# agent's process only runs the runner and the agent; the server, engine and trainer run elsewhere.
# This venv is also the check that a runner-only install works (tests/test_runner_only_install.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-crewai
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.kiln-installed
want=$(sha256sum pyproject.toml scripts/setup_crewai.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[crewai]"
# Fail here, not in a test, if the environment cannot run a crew through AgentKiln's runner.
"$VENV/bin/python" -c "import crewai, agentkiln.runner.runner, agentkiln.cli.main"
echo "$want" > "$stamp"
