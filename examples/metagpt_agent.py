"""MetaGPT: a `Calculator` Role with one Action that asks the model, over AgentKiln's gateway.

MetaGPT 0.8.2 pins what no environment of ours can hold (openai~=1.39, typer==0.9.0,
typing-extensions==4.9.0, and lancedb==0.4.0, which the package index lacks), so it runs in its own
virtual environment, `.venv-metagpt` (`bash scripts/setup_metagpt.sh`: MetaGPT `--no-deps` plus the
part of its requirements that importing it needs, see examples/README.md).

The model is configured in code, per attempt: the Role gets a `Context` whose `Config` is
`Config.from_llm_config(...)` (api_type openai, base_url = the attempt's gateway URL naming the
agent, api_key = the attempt's token), and its Action calls the model through MetaGPT's own OpenAI
client (`Action._aask`). MetaGPT still builds a default `Config` when it is imported and refuses to
import without an `llm` in some config2.yaml; it also writes logs/ and workspace/ under its
project root (the current directory unless METAGPT_PROJECT_ROOT is set). So before importing it this
module points METAGPT_PROJECT_ROOT at a scratch directory holding a placeholder config2.yaml (never
used for a call; removed at exit): nothing in the user's home is read or needed, nothing lands in
the working directory. `calc_usage=False`: MetaGPT neither counts tokens with tiktoken (which would
download its encodings) nor prices the calls (its cost table does not know our model; usage is
recorded by the gateway anyway). MetaGPT's OpenAI client sends only `temperature` and `max_tokens`
of the published sampling (other keys have no field there); its defaults, 0.0 and 4096, apply
when the resources publish none. No telemetry: MetaGPT's agentops hook lives in its software-company
CLI only, and agentops is not installed.
Run (in the metagpt venv): `.venv-metagpt/bin/kiln run examples.metagpt_agent:agent --server URL`.
Tested by tests/test_frameworks_metagpt.py.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

PLACEHOLDER_CONFIG = "llm:\n  api_type: openai\n  api_key: set-per-attempt\n  model: set-per-attempt\n"


def _metagpt_project_root() -> Path:
    """A scratch METAGPT_PROJECT_ROOT with a placeholder config2.yaml (MetaGPT cannot be imported without one)."""
    if os.environ.get("METAGPT_PROJECT_ROOT"):
        root = Path(os.environ["METAGPT_PROJECT_ROOT"])
    else:
        root = Path(tempfile.mkdtemp(prefix="kiln-metagpt-"))
        os.environ["METAGPT_PROJECT_ROOT"] = str(root)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    config = root / "config" / "config2.yaml"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(PLACEHOLDER_CONFIG)
    return root


_metagpt_project_root()  # before the metagpt imports below

from metagpt.actions import Action
from metagpt.config2 import Config
from metagpt.context import Context
from metagpt.roles import Role
from metagpt.schema import Message

import agentkiln as kiln
from examples import common

AGENT_NAME = "calculator"
PROMPT = "Solve this arithmetic question. End with one sentence: 'The answer is <number>.'\nQuestion: {question}"


class SolveArithmetic(Action):
    """Ask the model to solve the question in the last message."""

    name: str = "SolveArithmetic"

    async def run(self, history: list[Message]) -> str:
        return await self._aask(PROMPT.format(question=history[-1].content))


class Calculator(Role):
    name: str = "Cal"
    profile: str = "Calculator"
    goal: str = "Answer arithmetic questions exactly"
    constraints: str = "State the final number"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.set_actions([SolveArithmetic])


def metagpt_config(llm: kiln.LLMHandle, agent_name: str) -> Config:
    """MetaGPT's config for this attempt: its OpenAI client on the gateway URL that names `agent_name`."""
    me = llm.for_agent(agent_name)
    llm_config: dict[str, Any] = {
        "api_type": "openai",
        "base_url": me.base_url,
        "api_key": me.api_key,
        "model": llm.model,
        "stream": False,
        "calc_usage": False,
    }
    if "temperature" in llm.sampling:
        llm_config["temperature"] = llm.sampling["temperature"]
    if "max_tokens" in llm.sampling:
        llm_config["max_token"] = llm.sampling["max_tokens"]
    return Config.from_llm_config(llm_config)


@kiln.rollout
async def agent(task: Any, llm: kiln.LLMHandle) -> float:
    role = Calculator(context=Context(config=metagpt_config(llm, AGENT_NAME)))
    reply = await role.run(common.question(task))
    return common.score(reply.content if reply else None, task)
