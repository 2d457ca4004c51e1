"""LangGraph: the prebuilt ReAct agent with a tool, and a write -> check -> rewrite loop graph.

`agent`: `create_react_agent` over `ChatOpenAI` with the `calculate` tool ("solver").
`write_check`: two agents in one graph. The writer answers, the checker replies OK or
"REVISE: <why>", the writer rewrites (at most MAX_REWRITES times). Each agent's ChatOpenAI gets its
own base URL from `llm.for_agent(...)`, so the recorded calls say which agent made them and
training can pick one (`agent_match="^writer$"`). The writer's turns form one growing history:
each rewrite's prompt holds its earlier drafts.
Run: `kiln run examples.langgraph_react:agent` or `examples.langgraph_react:write_check`.
"""

from __future__ import annotations

import warnings
from typing import Any, TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import END, START, StateGraph
from langgraph.prebuilt import create_react_agent
from langgraph.warnings import LangGraphDeprecationWarning

import agentkiln as kiln
from examples import common

MAX_REWRITES = 2
WRITER_PROMPT = "Answer the question with one short sentence that states the number."
CHECKER_PROMPT = "You check answers. Reply OK if the answer is correct, otherwise REVISE: and the reason."


@tool
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as '17 * 23' and return the result."""
    return common.calculate(expression)


def chat_model(llm: kiln.LLMHandle, agent_name: str) -> ChatOpenAI:
    me = llm.for_agent(agent_name)
    return ChatOpenAI(model=llm.model, base_url=me.base_url, api_key=me.api_key, max_retries=1, **llm.sampling)


@kiln.rollout
def agent(task: Any, llm: kiln.LLMHandle) -> float:
    with warnings.catch_warnings():
        # langgraph 1.x points to langchain.agents.create_agent (another package); the prebuilt agent
        # works until langgraph 2, so do not warn on every rollout.
        warnings.simplefilter("ignore", LangGraphDeprecationWarning)
        react = create_react_agent(chat_model(llm, "solver"), [calculate], prompt=common.SYSTEM_PROMPT)
    state = react.invoke({"messages": [HumanMessage(common.question(task))]}, {"recursion_limit": 12})
    return common.score(str(state["messages"][-1].content), task)


class Draft(TypedDict):
    question: str
    writer_history: list[BaseMessage]  # the writer's own conversation, grown turn by turn
    verdict: str
    rewrites: int


def build_write_check(writer: ChatOpenAI, checker: ChatOpenAI) -> Any:
    def write(state: Draft) -> dict[str, Any]:
        history = state["writer_history"] or [SystemMessage(WRITER_PROMPT), HumanMessage(state["question"])]
        if state["verdict"]:  # a rewrite: the checker's objection is the next user turn
            history = [*history, HumanMessage(f"A checker says: {state['verdict']}. Rewrite your answer.")]
        draft = writer.invoke(history)
        return {"writer_history": [*history, AIMessage(str(draft.content))]}

    def check(state: Draft) -> dict[str, Any]:
        answer = state["writer_history"][-1].content
        verdict = checker.invoke(
            [SystemMessage(CHECKER_PROMPT), HumanMessage(f"Question: {state['question']}\nAnswer: {answer}")]
        )
        return {"verdict": str(verdict.content).strip()}

    def route(state: Draft) -> str:
        if state["verdict"].upper().startswith("OK") or state["rewrites"] >= MAX_REWRITES:
            return END
        return "rewrite"

    def count_rewrite(state: Draft) -> dict[str, Any]:
        return {"rewrites": state["rewrites"] + 1}

    graph = StateGraph(Draft)
    graph.add_node("write", write)
    graph.add_node("check", check)
    graph.add_node("rewrite", count_rewrite)
    graph.add_edge(START, "write")
    graph.add_edge("write", "check")
    graph.add_conditional_edges("check", route, {"rewrite": "rewrite", END: END})
    graph.add_edge("rewrite", "write")
    return graph.compile()


@kiln.rollout
def write_check(task: Any, llm: kiln.LLMHandle) -> float:
    graph = build_write_check(chat_model(llm, "writer"), chat_model(llm, "checker"))
    state = graph.invoke(
        {"question": common.question(task), "writer_history": [], "verdict": "", "rewrites": 0},
        {"recursion_limit": 20},
    )
    return common.score(str(state["writer_history"][-1].content), task)
