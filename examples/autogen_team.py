"""AutoGen AgentChat: an `AssistantAgent` with a tool, and a two-agent `RoundRobinGroupChat` team.

AutoGen's `OpenAIChatCompletionClient` only knows OpenAI's model names, so it needs `model_info`
for ours. In `team` each agent gets its own client whose base URL names it (`llm.for_agent(...)`):
every agent runs in the same task, and AutoGen names no speaker in what it sends (only the senders
of user messages), so nothing else in a call tells them apart. `shared_team` keeps AutoGen's usual
one client for the team; the gateway then names each call by its system prompt with the rules in
`AGENT_NAMES` (`kiln.Trainer(..., agent_names=AGENT_NAMES)` or `kiln serve --agent-name
'^You solve=solver' --agent-name '^You review=reviewer'`).
Run: `kiln run examples.autogen_team:agent` (or `:team`, `:shared_team`).
"""

from __future__ import annotations

from typing import Any

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.conditions import MaxMessageTermination, TextMentionTermination
from autogen_agentchat.teams import RoundRobinGroupChat
from autogen_ext.models.openai import OpenAIChatCompletionClient

import agentkiln as kiln
from examples import common

MODEL_INFO = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": "unknown",
    "structured_output": False,
}
REVIEWER_PROMPT = "You review the solver's answer. Reply APPROVED if it is right, otherwise explain the mistake."


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23' and return the result."""
    return common.calculate(expression)


def model_client(llm: kiln.LLMHandle, agent_name: str | None = None) -> OpenAIChatCompletionClient:
    """A client whose URL names `agent_name`; without one, the attempt's URL (the server's map names the calls)."""
    me = llm.for_agent(agent_name) if agent_name else llm
    return OpenAIChatCompletionClient(
        model=llm.model, base_url=me.base_url, api_key=me.api_key, model_info=MODEL_INFO, max_retries=1, **llm.sampling
    )


def solver_agent(client: OpenAIChatCompletionClient) -> AssistantAgent:
    return AssistantAgent(
        "solver",
        model_client=client,
        tools=[calculate],
        system_message=common.SYSTEM_PROMPT,
        reflect_on_tool_use=True,
    )


@kiln.rollout
async def agent(task: Any, llm: kiln.LLMHandle) -> float:
    client = model_client(llm, "solver")
    try:
        result = await solver_agent(client).run(task=common.question(task))
        return common.score(str(result.messages[-1].content), task)
    finally:
        await client.close()


# Agent name <- the system prompt that starts it, for `shared_team` (searched with re.search).
AGENT_NAMES = {"^You solve arithmetic": "solver", "^You review the solver": "reviewer"}


async def run_team(
    task: Any, solver_client: OpenAIChatCompletionClient, reviewer_client: OpenAIChatCompletionClient
) -> float:
    """Solver and reviewer take turns until the reviewer says APPROVED (or 6 messages)."""
    solver = solver_agent(solver_client)
    reviewer = AssistantAgent("reviewer", model_client=reviewer_client, system_message=REVIEWER_PROMPT)
    stop = TextMentionTermination("APPROVED", sources=["reviewer"]) | MaxMessageTermination(6)
    result = await RoundRobinGroupChat([solver, reviewer], termination_condition=stop).run(task=common.question(task))
    answers = [m.content for m in result.messages if m.source == "solver" and isinstance(m.content, str)]
    return common.score(answers[-1] if answers else None, task)


@kiln.rollout
async def team(task: Any, llm: kiln.LLMHandle) -> float:
    """One client per agent, each named by its URL."""
    clients = [model_client(llm, "solver"), model_client(llm, "reviewer")]
    try:
        return await run_team(task, *clients)
    finally:
        for client in clients:
            await client.close()


@kiln.rollout
async def shared_team(task: Any, llm: kiln.LLMHandle) -> float:
    """One client for both agents: their calls are named by the server's `AGENT_NAMES` rules."""
    client = model_client(llm)
    try:
        return await run_team(task, client, client)
    finally:
        await client.close()
