#!/usr/bin/env bash
# Creates .venv-metagpt: MetaGPT 0.8.2 + AgentKiln's runner, for examples/metagpt_agent.py and its test.
# Re-runs only when pyproject.toml or this script changes.
#
# MetaGPT cannot be a pip extra of ours: its requirements cannot be met as they stand. 0.8.2 (the
# newest release on the index) pins lancedb==0.4.0, which the index does not have, and openai~=1.39,
# typer==0.9.0, typing-extensions==4.9.0, httpx==0.27.2, rich==13.6.0, which conflict with
# AgentKiln's core (openai>=2, typer>=0.12, ...). So MetaGPT is installed `--no-deps`, then in one
# resolver run AgentKiln's runner-only install (the core, no extras: no torch) plus the part of
# MetaGPT's requirement list that `import metagpt.roles, metagpt.actions` needs (MetaGPT imports
# every LLM provider at start-up), at MetaGPT's own pins except where they conflict:
#   - google-generativeai==0.4.1 needs protobuf<5; opentelemetry-proto (our core) needs >=5: relaxed to >=0.4.1.
#   - openai, typer, typing-extensions, httpx, rich, pydantic: whatever AgentKiln's core resolves (openai 2+).
#   - chardet: imported by metagpt.utils.common, not in MetaGPT's list.
# Left out (not imported by a Role running Actions): lancedb, faiss-cpu, qdrant-client, meilisearch,
# semantic-kernel, ipython/ipykernel/ipywidgets, ta, networkx, jieba, rank-bm25, redis, channels, fire,
# libcst, curl-cffi, the grpcio pins, agentops (so no telemetry), and the rest of the list.
# Checked with a Role running an Action through the gateway (tests/test_frameworks_metagpt.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-metagpt
METAGPT=metagpt==0.8.2
METAGPT_DEPS=(
  aiofiles==23.2.1 aiohttp==3.8.6 anthropic==0.18.1 beautifulsoup4==4.12.3 "boto3~=1.34.69" chardet
  "dashscope~=1.19.3" gitignore-parser==0.1.9 gitpython==3.1.40 "google-generativeai>=0.4.1" gymnasium==0.29.1
  imap-tools==1.5.0 loguru==0.6.0 nbclient==0.9.0 nbformat==5.9.2 "numpy~=1.26.4" pandas==2.1.1 Pillow
  "playwright>=1.26" python-docx==0.8.11 PyYAML==6.0.1 "qianfan~=0.4.4" scikit-learn==1.3.2
  "spark-ai-python~=0.3.30" tenacity==8.2.3 tiktoken==0.7.0 "tree-sitter~=0.23.2" "tree-sitter-python~=0.23.2"
  "volcengine-python-sdk[ark]~=1.0.94" "zhipuai~=2.1.5"
)
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp=$VENV/.kiln-installed
want=$(sha256sum pyproject.toml scripts/setup_metagpt.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q --no-deps "$METAGPT"
# pip then lists the MetaGPT pins left unmet ("metagpt 0.8.2 requires ..."): expected, see above.
"$VENV/bin/python" -m pip install -q -e . "${METAGPT_DEPS[@]}"
# Fail here, not in a test, if the environment cannot build a MetaGPT Role or run AgentKiln's runner
# (the example comes first: importing it also checks that MetaGPT imports without any config2.yaml in HOME).
home=$(mktemp -d)
HOME=$home "$VENV/bin/python" -W ignore -c "
import importlib.util, examples.metagpt_agent, metagpt.roles, metagpt.actions, agentkiln.runner.runner, agentkiln.cli.main
heavy = [m for m in ('torch', 'transformers') if importlib.util.find_spec(m)]
assert not heavy, f'.venv-metagpt must stay without the training stack: {heavy}'
" >/dev/null
rm -rf "$home"
echo "$want" > "$stamp"
