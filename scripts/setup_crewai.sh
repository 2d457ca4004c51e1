#!/usr/bin/env bash
# Creates .venv-crewai: CrewAI + AgentKiln's runner, for examples/crewai_agent.py and its test.
# CrewAI pins openai<3 and openai-agents needs openai>=3, so CrewAI cannot live in .venv.
# Re-runs only when pyproject.toml or this script changes.
#
# Lean on purpose: AgentKiln is installed --no-deps plus its dependencies minus the training stack
# (torch, transformers, peft, gguf, matplotlib). An agent's process only runs the runner and the
# agent; the server, engine and trainer run elsewhere. `pip install -e '.[crewai]'` also works but
# is twice the size (~2.1 GB vs ~1 GB) and takes ~3x as long.
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
# AgentKiln's runtime requirements and the crewai extra, read from pyproject.toml.
mapfile -t reqs < <("$VENV/bin/python" - <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
training = {"torch", "transformers", "peft", "gguf", "matplotlib"}
for req in project["dependencies"]:
    if re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() not in training:
        print(req)
for req in project["optional-dependencies"]["crewai"]:
    print(req)
EOF
)
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${reqs[@]}"
"$VENV/bin/python" -m pip install -q --no-deps -e .
# Fail here, not in a test, if the environment cannot run a crew through AgentKiln's runner.
"$VENV/bin/python" -c "import crewai, agentkiln.runner.runner, agentkiln.cli.main"
echo "$want" > "$stamp"
