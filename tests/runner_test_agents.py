"""Agents used by tests/test_runner_integration.py; a module so spawned worker processes can import them."""

from __future__ import annotations

import os
import time

import agentkiln.runner as kiln


@kiln.rollout
def hang_first(task, attempt):
    """First attempt: records progress, then hangs (the test SIGKILLs its process); later attempts succeed."""
    kiln.emit_message(f"started attempt {attempt.sequence_id} in pid {os.getpid()}")
    if attempt.sequence_id == 1:
        kiln.emit_reward(0.1, final=False)  # written before emit_reward returns
        time.sleep(120)
    return 1.0


class PidAgent(kiln.Agent):
    """Reports which process ran it and how often setup ran there."""

    def setup(self):
        self.setups = getattr(self, "setups", 0) + 1

    async def rollout(self, task):
        kiln.emit_object({"pid": os.getpid(), "setups": self.setups})
        return float(task["n"])


@kiln.rollout
def simple(task):
    kiln.emit_message(f"solving {task}")
    return 0.5


@kiln.rollout
async def chat(task, llm):
    """Calls the model through this attempt's gateway route."""
    client = llm.async_openai()
    resp = await client.chat.completions.create(messages=[{"role": "user", "content": task["q"]}], **llm.chat_kwargs())
    return 1.0 if resp.choices[0].message.content == task["expect"] else 0.0


@kiln.rollout
def call_then_hang_first(task, llm, attempt):
    """One LLM call through the gateway, then hangs on the first attempt (to be SIGKILLed)."""
    client = llm.openai()
    client.chat.completions.create(messages=[{"role": "user", "content": "2+2"}], **llm.chat_kwargs())
    if attempt.sequence_id == 1:
        kiln.emit_reward(0.1, final=False)
        time.sleep(120)
    return 1.0
