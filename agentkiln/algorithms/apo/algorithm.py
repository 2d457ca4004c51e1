"""APO: automatic prompt optimization by beam search with textual gradients.

Each round runs the prompts in the beam on a batch of training tasks, shows an optimizer LLM
the failures (task, the agent's final answer, reward) and asks for a critique (the "textual
gradient"), then for rewrites that act on it. Rewrites must keep the template's placeholders
(an agent formats the template with them); the survivors are scored on validation rollouts
and the best `beam_width` prompts go on. No weights change: each candidate is a resources
version with a different prompt, so any agent that reads its `prompts` argument is optimized.
Publishing, rollouts, validation and history go through the shared `training.loop.Run`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from agentkiln.algorithms.apo.config import OptimizerLLM
from agentkiln.algorithms.apo.prompts import (
    CRITIQUE_SYSTEM,
    CRITIQUE_USER,
    REWRITE_SYSTEM,
    REWRITE_USER,
    Failure,
    check_candidate,
    collect_failures,
    extract_prompt,
    placeholder_rule,
    placeholders,
    render_failures,
)
from agentkiln.models import LLMEndpoint, PromptTemplate, RolloutConfig, RolloutMode
from agentkiln.training.context import Algorithm, TrainingContext, TrainingResult
from agentkiln.training.loop import Run, default_rollout_config
from agentkiln.training.trace import Trace, mean_reward

log = logging.getLogger(__name__)

HISTORY_FILE = "apo_history.json"
BEST_FILE = "best_prompt.json"


async def base_resources(
    ctx: TrainingContext,
    llms: dict[str, LLMEndpoint] | None,
    prompt_name: str,
    initial_prompt: str | PromptTemplate | None,
) -> tuple[dict[str, LLMEndpoint], dict[str, PromptTemplate], PromptTemplate]:
    """What a prompt optimizer starts from: the endpoints and prompts to publish candidates with
    (the latest published ones unless given) and the starting template (checked)."""
    latest = await ctx.store.get_latest_resources()
    llms = (
        dict(llms)
        if llms is not None
        else dict(latest.llms)
        if latest and latest.llms
        else {"main": LLMEndpoint(model=ctx.model_name)}
    )
    prompts = dict(latest.prompts) if latest else {}
    initial = initial_prompt
    if initial is None:
        if prompt_name not in prompts:
            raise ValueError(f"no initial prompt: give initial_prompt or publish prompts[{prompt_name!r}]")
        initial = prompts[prompt_name]
    template = initial if isinstance(initial, PromptTemplate) else PromptTemplate(template=initial)
    placeholders(template)  # fail early on a malformed starting template
    return llms, prompts, template


async def publish_prompt(
    run: Run,
    llms: dict[str, LLMEndpoint],
    prompts: dict[str, PromptTemplate],
    prompt_name: str,
    template: PromptTemplate,
    text: str,
    note: dict[str, Any],
) -> str:
    """Publish `text` as prompts[prompt_name] (the template's other settings kept); its resources id."""
    candidate = {**prompts, prompt_name: template.model_copy(update={"template": text})}
    return (await run.publish(llms, candidate, note)).resources_id


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
    rollout_config: RolloutConfig = field(default_factory=default_rollout_config)
    seed: int = 0
    _next_id: int = field(default=0, init=False, repr=False)

    # ------------------------------------------------------------------ resources
    async def _base(
        self, ctx: TrainingContext
    ) -> tuple[dict[str, LLMEndpoint], dict[str, PromptTemplate], PromptTemplate]:
        return await base_resources(ctx, self.llms, self.prompt_name, self.initial_prompt)

    async def _publish(self, run: Run, text: str, note: dict[str, Any]) -> str:
        return await publish_prompt(run, self._llms, self._prompts, self.prompt_name, self._template, text, note)

    async def _publish_all(self, run: Run, cands: Sequence[Candidate]) -> list[str]:
        """One resources version per candidate, published in turn (each waits until served)."""
        return [await self._publish(run, c.prompt, {"candidate": c.id, "round": c.round}) for c in cands]

    async def _rollouts(
        self, run: Run, cands: Sequence[Candidate], tasks: Sequence[Any], tag: str
    ) -> list[list[Trace]]:
        """Run `tasks` under each candidate prompt; all candidates' rollouts run together so the
        engine batches them."""
        rids = await self._publish_all(run, cands)
        return list(
            await asyncio.gather(
                *[run.rollouts(tasks, rid, RolloutMode.train, f"apo-{tag}-c{c.id}") for c, rid in zip(cands, rids)]
            )
        )

    async def _score(self, run: Run, cands: Sequence[Candidate], val: Sequence[Any], tag: str) -> None:
        """Validation reward of each candidate (all candidates' rollouts run together)."""
        rids = await self._publish_all(run, cands)
        scores = await asyncio.gather(
            *[
                run.validate(val, rid, f"{tag}-c{c.id}", group_prefix=f"apo-{tag}-c{c.id}")
                for c, rid in zip(cands, rids)
            ]
        )
        for c, score in zip(cands, scores):
            c.score = score

    def _new(self, prompt: str, rnd: int, parent: int | None = None, critique: str | None = None) -> Candidate:
        self._next_id += 1
        return Candidate(prompt=prompt, round=rnd, parent=parent, critique=critique, id=self._next_id - 1)

    # ------------------------------------------------------------------ textual gradient
    async def _expand(
        self, ctx: TrainingContext, client: Any, parent: Candidate, failures: list[Failure], rnd: int
    ) -> tuple[str, list[Candidate], list[dict[str, Any]]]:
        critique = (
            await self.optimizer.ask(
                client,
                ctx,
                CRITIQUE_SYSTEM,
                CRITIQUE_USER.format(prompt=parent.prompt, failures=render_failures(failures[: self.max_failures])),
            )
        ).strip()
        rule = placeholder_rule(self._template)
        rejected: list[dict[str, Any]] = []

        async def rewrite() -> Candidate | None:
            for _try in range(self.max_retries + 1):
                reply = await self.optimizer.ask(
                    client,
                    ctx,
                    REWRITE_SYSTEM,
                    REWRITE_USER.format(prompt=parent.prompt, critique=critique, placeholder_rule=rule),
                )
                text = extract_prompt(reply)
                why = check_candidate(
                    self._template.model_copy(update={"template": text}), self._template, self.max_prompt_chars
                )
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
        run = Run(ctx, "apo", self.rollout_config)
        run.reset_history()
        rng = random.Random(self.seed)
        self._llms, self._prompts, self._template = await self._base(ctx)
        val = list(val_data) if val_data else rng.sample(list(train_data), min(len(train_data), 8))
        client = self.optimizer.client(ctx)
        history: list[dict[str, Any]] = []
        result = run.result

        start = self._new(self._template.template, 0)
        await self._score(run, [start], val, "r0")
        beam = [start]
        seen = {start.prompt}
        result.val_before = start.score
        history.append({"round": 0, "candidates": [asdict(start)], "beam": [start.id]})
        self._save(run, history, beam[0])

        try:
            for rnd in range(1, self.rounds + 1):
                tasks = rng.sample(list(train_data), min(self.train_batch_size, len(train_data)))
                runs = await self._rollouts(run, beam, tasks, f"r{rnd}-train")
                new: list[Candidate] = []
                record: dict[str, Any] = {"round": rnd, "train": [], "rejected": []}
                expand = []
                for parent, traces in zip(beam, runs):
                    failures = collect_failures(traces, self.success_reward)
                    record["train"].append(
                        {"candidate": parent.id, "reward": mean_reward(traces), "failures": len(failures)}
                    )
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
                    await self._score(run, new, val, f"r{rnd}")
                # Stable sort: on equal scores the older prompt (earlier in the beam) stays ahead.
                beam = sorted(beam + new, key=lambda c: -(c.score or 0.0))[: self.beam_width]
                elapsed = round(run.elapsed(), 1)
                record.update(
                    candidates=[asdict(c) for c in new],
                    beam=[c.id for c in beam],
                    best_score=beam[0].score,
                    elapsed_s=elapsed,
                )
                history.append(record)
                self._save(run, history, beam[0])
                run.record(
                    "round", {"round": rnd, "val_reward": beam[0].score, "candidates": len(new), "elapsed_s": elapsed}
                )
                log.info("APO round %d: %d new candidates, best %.3f", rnd, len(new), beam[0].score or 0.0)
        finally:
            await client.close()

        best = beam[0]
        self.best = best
        final_id = await self._publish(run, best.prompt, {"candidate": best.id, "best": True})
        result.val_after = result.best_val = best.score
        result.history = history
        result.elapsed_s = run.elapsed()
        result.extra.update(best_prompt=best.prompt, best_candidate=best.id, final_resources_id=final_id)
        return result

    def best_prompt(self) -> PromptTemplate:
        """The best template found by the last `run` (raises before any run)."""
        best = getattr(self, "best", None)
        if best is None:
            raise RuntimeError("APO has not run yet")
        return self._template.model_copy(update={"template": best.prompt})

    def _save(self, run: Run, history: list[dict[str, Any]], best: Candidate) -> None:
        """The full search record (every candidate, critique and rejection) and the best prompt so far."""
        run_dir = run.run_dir
        (run_dir / HISTORY_FILE).write_text(json.dumps(history, indent=2, default=str))
        (run_dir / BEST_FILE).write_text(
            json.dumps(
                {
                    "name": self.prompt_name,
                    "template": best.prompt,
                    "engine": self._template.engine,
                    "score": best.score,
                },
                indent=2,
            )
        )
