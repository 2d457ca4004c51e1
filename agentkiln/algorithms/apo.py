"""APO: automatic prompt optimization by beam search with textual gradients.

Each round runs the prompts in the beam on a batch of training tasks, shows an optimizer LLM
the failures (task, the agent's final answer, reward) and asks for a critique (the "textual
gradient"), then for rewrites that act on it. Rewrites must keep the template's placeholders
(an agent formats the template with them); the survivors are scored on validation rollouts
and the best `beam_width` prompts go on. No weights change: each candidate is a resources
version with a different prompt, so any agent that reads its `prompts` argument is optimized.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import string
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentkiln.algorithms.base import Algorithm, TrainingContext, TrainingResult
from agentkiln.algorithms.rollout_batch import RolloutOutcome, mean_reward, run_rollouts
from agentkiln.models import LLMEndpoint, PromptTemplate, ResourcesIn, RolloutConfig, RolloutMode, SpanAttrs, SpanNames

log = logging.getLogger(__name__)

HISTORY_FILE = "apo_history.json"
BEST_FILE = "best_prompt.json"

CRITIQUE_SYSTEM = "You review instructions given to an AI agent and explain briefly why the agent failed."
CRITIQUE_USER = """The agent was given this prompt:
<prompt>
{prompt}
</prompt>

It failed on these tasks:
{failures}

In a few sentences, say what is wrong or missing in the prompt that caused these failures."""

REWRITE_SYSTEM = "You improve instructions given to an AI agent. Reply with the new prompt only, inside <prompt></prompt>."
REWRITE_USER = """Current prompt:
<prompt>
{prompt}
</prompt>

Feedback on the prompt:
{critique}

Write an improved prompt that fixes these problems.{placeholder_rule}
Reply with the new prompt only, inside <prompt></prompt>."""


# --------------------------------------------------------------------------- templates


def placeholders(template: PromptTemplate) -> set[str]:
    """Names a template is formatted with; raises ValueError on a malformed template."""
    if template.engine == "jinja":
        import jinja2
        from jinja2 import meta

        try:
            return set(meta.find_undeclared_variables(jinja2.Environment().parse(template.template)))
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(str(exc)) from exc
    names = set()
    for _, name, _, _ in string.Formatter().parse(template.template):
        if name is not None:
            if name == "" or name.isdigit():
                raise ValueError("positional {} fields are not allowed")
            names.add(re.split(r"[.\[]", name, maxsplit=1)[0])
    return names


def check_candidate(candidate: PromptTemplate, original: PromptTemplate, max_chars: int) -> str | None:
    """Why a rewrite is unusable (None = usable): empty, too long, broken, or placeholders changed."""
    text = candidate.template.strip()
    if not text:
        return "empty prompt"
    if len(text) > max_chars:
        return f"longer than {max_chars} characters"
    try:
        got, want = placeholders(candidate), placeholders(original)
    except ValueError as exc:
        return f"malformed template: {exc}"
    if got != want:
        return f"placeholders {sorted(got)} differ from {sorted(want)}"
    return None


def extract_prompt(text: str) -> str:
    """The prompt inside <prompt>...</prompt>, else the reply without code fences (small models forget tags)."""
    found = re.findall(r"<prompt>\s*(.*?)\s*(?:</prompt>|$)", text or "", flags=re.DOTALL | re.IGNORECASE)
    if found and found[-1].strip():
        return found[-1].strip()
    return re.sub(r"^```\w*\n?|\n?```$", "", (text or "").strip()).strip()


# --------------------------------------------------------------------------- failures


@dataclass
class Failure:
    task: Any
    answer: str | None
    reward: float
    error: str | None = None


def final_answer(outcome: RolloutOutcome) -> str | None:
    """Text of the last LLM reply of the rollout's latest attempt (tool calls rendered as calls)."""
    attempt = outcome.attempts[-1] if outcome.attempts else None
    calls = [
        s for s in outcome.spans
        if s.name == SpanNames.llm_call and (attempt is None or s.attempt_id == attempt.attempt_id)
    ]
    if not calls:
        return None
    body = max(calls, key=lambda s: s.sequence_id).attributes.get(SpanAttrs.response) or {}
    try:
        message = body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return body.get("output_text") if isinstance(body, dict) else None
    if message.get("content"):
        return str(message["content"])
    calls_text = [
        f"{c.get('function', {}).get('name')}({c.get('function', {}).get('arguments')})"
        for c in message.get("tool_calls") or []
    ]
    return "tool call: " + ", ".join(calls_text) if calls_text else ""


def collect_failures(outcomes: Sequence[RolloutOutcome], success_reward: float) -> list[Failure]:
    out = []
    for o in outcomes:
        if o.reward >= success_reward:
            continue
        attempt = o.attempts[-1] if o.attempts else None
        error = attempt.error.message if attempt is not None and attempt.error is not None else None
        out.append(Failure(task=o.rollout.input, answer=final_answer(o), reward=o.reward, error=error))
    return out


def render_failures(failures: Sequence[Failure], max_chars: int = 400) -> str:
    lines = []
    for i, f in enumerate(failures, 1):
        task = json.dumps(f.task, ensure_ascii=False, default=str)[:max_chars]
        answer = (f.answer or "(no answer)")[:max_chars]
        line = f"{i}. Task: {task}\n   Agent's answer: {answer}\n   Reward: {f.reward:g}"
        if f.error:
            line += f"\n   Error: {f.error[:max_chars]}"
        lines.append(line)
    return "\n".join(lines)


# --------------------------------------------------------------------------- optimizer LLM


@dataclass
class OptimizerLLM:
    """Any OpenAI-compatible chat endpoint. None fields default to the kiln server's gateway (/v1)
    and the model it serves, so the engine being optimized can critique itself."""

    base_url: str | None = None
    model: str | None = None
    api_key: str | None = None
    temperature: float = 0.7
    max_tokens: int = 300
    timeout_s: float = 300.0

    def client(self, ctx: TrainingContext) -> Any:
        import openai

        base = self.base_url or ctx.server_url.rstrip("/") + "/v1"
        return openai.AsyncOpenAI(base_url=base, api_key=self.api_key or ctx.api_key or "kiln", timeout=self.timeout_s)

    async def ask(self, client: Any, ctx: TrainingContext, system: str, user: str) -> str:
        reply = await client.chat.completions.create(
            model=self.model or ctx.model_name,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        return reply.choices[0].message.content or ""


# --------------------------------------------------------------------------- algorithm


@dataclass
class Candidate:
    prompt: str
    score: float | None = None
    round: int = 0
    parent: int | None = None
    critique: str | None = None
    id: int = 0


@dataclass
class APO(Algorithm):
    """Beam search over one prompt template of the agent.

    prompt_name: key in the published `prompts` the agent reads. initial_prompt: the starting
        template (None = the one in the latest published resources).
    rounds / beam_width / branch_factor: search size (each beam prompt yields branch_factor rewrites).
    train_batch_size: training tasks each beam prompt runs per round to find failures.
    success_reward: a rollout with a reward below this is a failure shown to the optimizer.
    max_retries: extra rewrite requests when a rewrite breaks the placeholders (then give up).
    val_data is scored for every candidate; without it, a fixed sample of train_data is used.
    """

    prompt_name: str = "system"
    initial_prompt: str | PromptTemplate | None = None
    rounds: int = 2
    beam_width: int = 2
    branch_factor: int = 2
    train_batch_size: int = 4
    max_failures: int = 4
    success_reward: float = 1.0
    max_retries: int = 2
    max_prompt_chars: int = 4000
    optimizer: OptimizerLLM = field(default_factory=OptimizerLLM)
    llms: dict[str, LLMEndpoint] | None = None
    rollout_config: RolloutConfig = field(
        default_factory=lambda: RolloutConfig(timeout_s=600, max_attempts=2, retry_on=["unresponsive", "timeout"])
    )
    seed: int = 0
    _next_id: int = field(default=0, init=False, repr=False)

    # ------------------------------------------------------------------ resources
    async def _base(self, ctx: TrainingContext) -> tuple[dict[str, LLMEndpoint], dict[str, PromptTemplate], PromptTemplate]:
        latest = await ctx.store.get_latest_resources()
        llms = dict(self.llms) if self.llms is not None else dict(latest.llms) if latest and latest.llms else {
            "main": LLMEndpoint(model=ctx.model_name)
        }
        prompts = dict(latest.prompts) if latest else {}
        initial = self.initial_prompt
        if initial is None:
            if self.prompt_name not in prompts:
                raise ValueError(f"no initial prompt: give initial_prompt or publish prompts[{self.prompt_name!r}]")
            initial = prompts[self.prompt_name]
        template = initial if isinstance(initial, PromptTemplate) else PromptTemplate(template=initial)
        placeholders(template)  # fail early on a malformed starting template
        return llms, prompts, template

    async def _publish(self, ctx: TrainingContext, text: str, note: dict[str, Any]) -> str:
        prompts = {**self._prompts, self.prompt_name: self._template.model_copy(update={"template": text})}
        resources = await ctx.store.add_resources(
            ResourcesIn(llms=self._llms, prompts=prompts, metadata={"algorithm": "apo", **note})
        )
        await ctx.wait_for_resources_served(resources.resources_id)
        return resources.resources_id

    async def _rollouts(
        self, ctx: TrainingContext, cands: Sequence[Candidate], tasks: Sequence[Any], mode: RolloutMode, tag: str
    ) -> list[list[RolloutOutcome]]:
        """Run `tasks` under each candidate prompt. Publications are sequential (each waits until
        served); the rollouts of all candidates then run together so the engine batches them."""
        rids = [await self._publish(ctx, c.prompt, {"candidate": c.id, "round": c.round}) for c in cands]
        return list(await asyncio.gather(*[
            run_rollouts(ctx.store, tasks, mode=mode, resources_id=rid, config=self.rollout_config,
                         group_prefix=f"apo-{tag}-c{c.id}")
            for c, rid in zip(cands, rids)
        ]))

    async def _score(self, ctx: TrainingContext, cands: Sequence[Candidate], val: Sequence[Any], tag: str) -> None:
        for c, outcomes in zip(cands, await self._rollouts(ctx, cands, val, RolloutMode.val, tag)):
            c.score = mean_reward(outcomes)
            ctx.on_event("validation", {"tag": f"{tag}-c{c.id}", "reward": c.score, "n": len(outcomes)})

    def _new(self, prompt: str, rnd: int, parent: int | None = None, critique: str | None = None) -> Candidate:
        self._next_id += 1
        return Candidate(prompt=prompt, round=rnd, parent=parent, critique=critique, id=self._next_id - 1)

    # ------------------------------------------------------------------ textual gradient
    async def _expand(
        self, ctx: TrainingContext, client: Any, parent: Candidate, failures: list[Failure], rnd: int
    ) -> tuple[str, list[Candidate], list[dict[str, Any]]]:
        critique = (await self.optimizer.ask(
            client, ctx, CRITIQUE_SYSTEM,
            CRITIQUE_USER.format(prompt=parent.prompt, failures=render_failures(failures[: self.max_failures])),
        )).strip()
        names = sorted(placeholders(self._template))
        rule = (
            " Keep these placeholders exactly, written in braces: " + ", ".join("{" + n + "}" for n in names) + "."
            if names else " Do not use curly braces."
        )
        rejected: list[dict[str, Any]] = []

        async def rewrite() -> Candidate | None:
            for _try in range(self.max_retries + 1):
                reply = await self.optimizer.ask(
                    client, ctx, REWRITE_SYSTEM,
                    REWRITE_USER.format(prompt=parent.prompt, critique=critique, placeholder_rule=rule),
                )
                text = extract_prompt(reply)
                why = check_candidate(self._template.model_copy(update={"template": text}), self._template,
                                      self.max_prompt_chars)
                if why is None:
                    return self._new(text, rnd, parent.id, critique)
                rejected.append({"parent": parent.id, "prompt": text[:1000], "reason": why})
                log.info("APO rewrite rejected (%s)", why)
            return None

        # Rewrites run concurrently: the engine batches them.
        out = [c for c in await asyncio.gather(*[rewrite() for _ in range(self.branch_factor)]) if c is not None]
        return critique, out, rejected

    # ------------------------------------------------------------------ main loop
    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Sequence[Any] | None = None
    ) -> TrainingResult:
        if not train_data:
            raise ValueError("APO needs at least one training task")
        started = time.monotonic()
        run_dir = Path(ctx.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        rng = random.Random(self.seed)
        self._llms, self._prompts, self._template = await self._base(ctx)
        val = list(val_data) if val_data else rng.sample(list(train_data), min(len(train_data), 8))
        client = self.optimizer.client(ctx)
        history: list[dict[str, Any]] = []
        result = TrainingResult()

        start = self._new(self._template.template, 0)
        await self._score(ctx, [start], val, "r0")
        beam = [start]
        seen = {start.prompt}
        result.val_before = start.score
        history.append({"round": 0, "candidates": [asdict(start)], "beam": [start.id]})
        self._save(run_dir, history, beam[0])

        try:
            for rnd in range(1, self.rounds + 1):
                tasks = rng.sample(list(train_data), min(self.train_batch_size, len(train_data)))
                runs = await self._rollouts(ctx, beam, tasks, RolloutMode.train, f"r{rnd}-train")
                new: list[Candidate] = []
                record: dict[str, Any] = {"round": rnd, "train": [], "rejected": []}
                expand = []
                for parent, outcomes in zip(beam, runs):
                    failures = collect_failures(outcomes, self.success_reward)
                    record["train"].append({"candidate": parent.id, "reward": mean_reward(outcomes),
                                            "failures": len(failures)})
                    if failures:
                        expand.append(self._expand(ctx, client, parent, failures, rnd))
                    else:
                        log.info("APO round %d: candidate %d solved its batch; not expanded", rnd, parent.id)
                for _critique, children, rejected in await asyncio.gather(*expand):
                    record["rejected"] += rejected
                    for child in children:
                        if child.prompt not in seen:
                            seen.add(child.prompt)
                            new.append(child)
                if new:
                    await self._score(ctx, new, val, f"r{rnd}")
                # Stable sort: on equal scores the older prompt (earlier in the beam) stays ahead.
                beam = sorted(beam + new, key=lambda c: -(c.score or 0.0))[: self.beam_width]
                record.update(candidates=[asdict(c) for c in new], beam=[c.id for c in beam],
                              best_score=beam[0].score, elapsed_s=round(time.monotonic() - started, 1))
                history.append(record)
                self._save(run_dir, history, beam[0])
                ctx.on_event("step", {"step": rnd, "val_reward": beam[0].score, "candidates": len(new)})
                log.info("APO round %d: %d new candidates, best %.3f", rnd, len(new), beam[0].score or 0.0)
        finally:
            await client.close()

        best = beam[0]
        self.best = best
        final_id = await self._publish(ctx, best.prompt, {"candidate": best.id, "best": True})
        result.val_after = result.best_val = best.score
        result.history = history
        result.elapsed_s = time.monotonic() - started
        result.extra.update(best_prompt=best.prompt, best_candidate=best.id, final_resources_id=final_id)
        return result

    def best_prompt(self) -> PromptTemplate:
        """The best template found by the last `run` (raises before any run)."""
        best = getattr(self, "best", None)
        if best is None:
            raise RuntimeError("APO has not run yet")
        return self._template.model_copy(update={"template": best.prompt})

    def _save(self, run_dir: Path, history: list[dict[str, Any]], best: Candidate) -> None:
        (run_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str))
        (run_dir / BEST_FILE).write_text(json.dumps(
            {"name": self.prompt_name, "template": best.prompt, "engine": self._template.engine, "score": best.score},
            indent=2,
        ))
