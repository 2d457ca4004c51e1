"""CrewAI: a two-agent crew (solver with a tool, then a reviewer) over AgentKiln's gateway.

CrewAI pins `openai<3`, so it cannot share an environment with openai-agents 0.24: it runs in its
own virtual environment, `.venv-crewai` (`bash scripts/setup_crewai.sh`, see examples/README.md).
Each agent's `LLM` gets a base URL naming it (`llm.for_agent(...)`): the crew runs both agents in
one process, so only the URL tells their calls apart. The `openai/` model prefix makes CrewAI use
its native OpenAI provider (the `openai` SDK; LiteLLM is not involved) against that URL.
Run (in the crewai venv; the variable keeps CrewAI from sending telemetry):
`CREWAI_DISABLE_TELEMETRY=true .venv-crewai/bin/kiln run examples.crewai_agent:agent --server URL`.
Tested by tests/test_frameworks_crewai.py.
"""

from __future__ import annotations

from typing import Any

from crewai import LLM, Agent, Crew, Process, Task
from crewai.tools import tool

import agentkiln as kiln
from examples import common


@tool("calculate")
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23' and return the result."""
    return common.calculate(expression)


def crew_llm(llm: kiln.LLMHandle, agent_name: str) -> LLM:
    me = llm.for_agent(agent_name)
    return LLM(model=f"openai/{llm.model}", base_url=me.base_url, api_key=me.api_key, **llm.sampling)


@kiln.rollout
def agent(task: Any, llm: kiln.LLMHandle) -> float:
    solver = Agent(
        role="Solver",
        goal="Answer arithmetic questions exactly",
        backstory=common.SYSTEM_PROMPT,
        tools=[calculate],
        llm=crew_llm(llm, "solver"),
        max_iter=4,
        verbose=False,
    )
    reviewer = Agent(
        role="Reviewer",
        goal="Make sure the final answer states the right number",
        backstory="You check answers and restate the correct result in one sentence.",
        llm=crew_llm(llm, "reviewer"),
        max_iter=2,
        verbose=False,
    )
    solve = Task(description=common.question(task), expected_output="The numeric result.", agent=solver)
    review = Task(
        description="Check the solver's answer and state the final result in one sentence.",
        expected_output="One sentence with the result.",
        agent=reviewer,
        context=[solve],
    )
    result = Crew(agents=[solver, reviewer], tasks=[solve, review], process=Process.sequential).kickoff()
    return common.score(result.raw, task)
