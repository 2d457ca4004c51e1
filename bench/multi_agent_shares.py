"""Untrained SmolLM2 shares of `kiln demo --multi-agent` (validation only, greedy, no training).

One rollout per validation task runs the planner with 3 and 1 worked examples, then the answerer
with 3, 1 and 0 on the 3-shot planner's result, and emits each variant's share as a named reward;
the demo's prompts are the 3-shot ones. Both shares should sit between 0.1 and 0.9 for GRPO to have
signal on each agent. Usage: .venv/bin/python bench/multi_agent_shares.py [n_val_tasks=16]
"""

from __future__ import annotations

import json
import sys
import time

from agentkiln.algorithms.grpo import GRPO
from agentkiln.demo import multi_agent as ma
from agentkiln.demo.tasks import make_tasks
from agentkiln.runner.emit import emit_reward
from agentkiln.trainer import Trainer

PLANNER_SHOTS = (3, 1)
ANSWERER_SHOTS = (3, 1, 0)


def variants(task, llm, rollout):
    planner, answerer = ma._client(llm.for_agent(ma.PLANNER)), ma._client(llm.for_agent(ma.ANSWERER))
    first = None
    for shots in PLANNER_SHOTS:
        reply = planner.chat.completions.create(
            model=llm.model, messages=ma.planner_messages(task["question"], shots), temperature=0.0,
            max_tokens=ma.PLANNER_MAX_TOKENS,
        )
        expression = ma.expression_of(reply.choices[0].message.content)
        result = ma.calculate(expression)
        right = result is not None and float(result) == float(task["answer"])
        emit_reward(1.0 if right else 0.0, name=f"planner_{shots}shot")
        first = first or (expression, result)
    expression, result = first
    for shots in ANSWERER_SHOTS:
        reply = answerer.chat.completions.create(
            model=llm.model, messages=ma.answerer_messages(task["question"], result, shots), temperature=0.0,
            max_tokens=ma.ANSWERER_MAX_TOKENS,
        )
        outcome = ma.score(task, expression, result, reply.choices[0].message.content)
        emit_reward(outcome.answerer, name=f"answerer_{shots}shot")
        emit_reward(outcome.correct, name=f"correct_{shots}shot")
    return 0.0


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    t0 = time.time()
    result = Trainer(GRPO(steps=0), n_runners=8, engine="smollm2", run_dir="runs/multi-agent-shares").fit(
        variants, make_tasks(8, seed=1), make_tasks(n, seed=2, prefix="val")  # the demo's first n val tasks
    )
    print(json.dumps(result.extra.get("val_rewards", {}).get("before"), indent=1, sort_keys=True))
    print(f"{time.time() - t0:.0f} s")
