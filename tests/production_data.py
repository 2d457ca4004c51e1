"""Hand-made production traffic for the training-side tests: sessions, their calls, users' feedback.

One fill, used on any store backend. What each session exercises (and what the tests expect):

* alice: a1 (prompt P, answer "4") thumbs up -> SFT, GRPO group; a2 unrated -> no_feedback;
  a0 older than the window, rated -> call_not_in_window; a "satisfaction" feedback on a1 that
  the name filter drops.
* bob: b1 (same prompt P, answer "5") "thumbs_down" with the correction "4" -> below threshold,
  a correction pair and a rated pair against a1 (same prompt, rated higher).
* carol: session rated False then True (the first superseded) -> c1 gets the session's 1; c2 has
  its own thumbs down, which wins over the session's -> the GRPO baseline pool {1, 0}.
* dave: a redacted call (no token ids) rated up -> dropped as redacted.
* erin: e1 labelled "meh" -> unknown_label (so unrated); e2 thumbs up without logprobs -> SFT only.
"""

from __future__ import annotations

import time
from typing import Any

from agentkiln.models import FeedbackIn, SpanIn
from agentkiln.protocol import LLMCall, SpanNames
from agentkiln.store.base import Store

NAME = "thumbs"
WINDOW_START = time.time() - 3600  # the tests read since this; a0 is recorded before it


def chat_prompt(tok: Any, question: str) -> list[int]:
    return list(tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"])


def answer_ids(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]


async def _call(store: Store, session: str, call_id: str, prompt: list[int] | None, response: list[int] | None,
                *, logprobs: bool = True, redacted: bool = False, version: str = "v1", at: float | None = None,
                text: str = "") -> str:
    ar = await store.open_session(session)
    rec = LLMCall(
        call_id=call_id, api="chat.completions", model_version=version, request={"messages": []},
        response={"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]},
        prompt_ids=prompt, response_ids=response, finish_reason="stop", temperature=1.0, session_id=session,
        logprobs=[-1.5] * len(response) if (logprobs and response is not None) else None, redacted=redacted,
    )
    start = at if at is not None else time.time() - 60
    [span] = await store.add_spans([SpanIn(
        rollout_id=ar.rollout.rollout_id, attempt_id=ar.attempt.attempt_id, name=SpanNames.llm_call,
        attributes=rec.attributes(), start_time=start, end_time=start + 0.1,
    )])
    return span.span_id


async def fill_production(store: Store, tok: Any) -> None:
    p = chat_prompt(tok, "What is 2 + 2?")
    await _call(store, "alice", "chatcmpl-a0", chat_prompt(tok, "Hello"), answer_ids(tok, "Hi"),
                at=WINDOW_START - 600)
    await _call(store, "alice", "chatcmpl-a1", p, answer_ids(tok, "4"), text="4")
    await _call(store, "alice", "chatcmpl-a2", chat_prompt(tok, "Thanks"), answer_ids(tok, "You are welcome"))
    await _call(store, "bob", "chatcmpl-b1", p, answer_ids(tok, "5"), version="v2", text="5")
    await _call(store, "carol", "chatcmpl-c1", chat_prompt(tok, "Name a colour"), answer_ids(tok, "Blue"))
    await _call(store, "carol", "chatcmpl-c2", chat_prompt(tok, "Name a fruit"), answer_ids(tok, "Stone"))
    await _call(store, "dave", "chatcmpl-d1", None, None, redacted=True)
    await _call(store, "erin", "chatcmpl-e1", chat_prompt(tok, "Any news?"), answer_ids(tok, "None"))
    await _call(store, "erin", "chatcmpl-e2", chat_prompt(tok, "Say yes"), answer_ids(tok, "Yes"), logprobs=False)

    posts = [
        FeedbackIn(response_id="chatcmpl-a0", name=NAME, value=True),
        FeedbackIn(response_id="chatcmpl-a1", name=NAME, value=True),
        FeedbackIn(response_id="chatcmpl-a1", name="satisfaction", value=False),
        FeedbackIn(response_id="chatcmpl-b1", name=NAME, value="thumbs_down", correction="4"),
        FeedbackIn(session_id="carol", name=NAME, value=False),
        FeedbackIn(session_id="carol", name=NAME, value=True),
        FeedbackIn(response_id="chatcmpl-c2", name=NAME, value=False),
        FeedbackIn(response_id="chatcmpl-d1", name=NAME, value=True),
        FeedbackIn(response_id="chatcmpl-e1", name=NAME, value="meh"),
        FeedbackIn(response_id="chatcmpl-e2", name=NAME, value="Thumbs_Up"),
    ]
    for post in posts:
        await store.add_feedback(post)
