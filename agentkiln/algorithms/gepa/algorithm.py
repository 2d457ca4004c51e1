"""GEPA: reflective prompt evolution, with the `gepa` library's optimizer and AgentKiln rollouts.

`gepa.optimize` proposes prompts and keeps a Pareto front of them over the validation tasks;
AgentKiln is its evaluator: each candidate prompt is published as a resources version, the
tasks run as rollouts on the runners, and each rollout's reward is its score. The reflective
feedback gepa shows its reflection LM is read from the recorded traces (`feedback`): the
messages of every LLM call, tool calls, failures and the reward. The reflection LM is any
OpenAI-compatible endpoint (APO's OptimizerLLM), called through the openai client (no litellm).
gepa runs in a worker thread; its evaluate / reflect calls run on the training loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agentkiln.algorithms.apo.algorithm import BEST_FILE, base_resources, publish_prompt
from agentkiln.algorithms.apo.config import OptimizerLLM
from agentkiln.algorithms.apo.prompts import check_candidate, final_answer, placeholder_rule
from agentkiln.algorithms.gepa.config import GEPAConfig
from agentkiln.algorithms.gepa.feedback import trace_record
from agentkiln.models import LLMEndpoint, PromptTemplate, RolloutConfig, RolloutMode
from agentkiln.training.context import Algorithm, TrainingContext, TrainingResult
from agentkiln.training.loop import Run, default_rollout_config

log = logging.getLogger(__name__)

HISTORY_FILE = "gepa_history.json"
REFLECT_SYSTEM = "You improve instructions given to an AI agent from traces of its runs."
T = TypeVar("T")


class _Logger:
    def log(self, message: str) -> None:
        log.info("gepa: %s", message)


class _Adapter:
    """gepa's GEPAAdapter over AgentKiln: rollouts evaluate, recorded traces reflect."""

    propose_new_texts = None  # gepa's own proposer asks the reflection LM

    def __init__(self, algo: GEPA, run: Run, loop: asyncio.AbstractEventLoop) -> None:
        self.algo, self.run, self.loop = algo, run, loop
        self.published: dict[str, str] = {}  # candidate text -> its resources id
        self.evaluations = 0
        self.rejected: list[dict[str, Any]] = []
        self.reflections = 0
        self.reflection_errors: list[str] = []

    def wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _rollouts(self, text: str, batch: Sequence[Any], mode: RolloutMode) -> list[Any]:
        if text not in self.published:
            note = {"candidate": len(self.published)}
            self.published[text] = await self.algo._publish(self.run, text, note)
        self.evaluations += 1
        return await self.run.rollouts(batch, self.published[text], mode, f"gepa-e{self.evaluations}")

    def evaluate(self, batch: list[Any], candidate: dict[str, str], capture_traces: bool = False) -> Any:
        from gepa import EvaluationBatch

        algo = self.algo
        text = candidate[algo.prompt_name]
        why = check_candidate(algo._template.model_copy(update={"template": text}), algo._template,
                              algo.max_prompt_chars)  # fmt: skip
        if why is not None:  # a broken template is scored 0 without running, and the reason is the feedback
            self.rejected.append({"prompt": text[:1000], "reason": why})
            log.info("GEPA candidate rejected (%s)", why)
            feedback = [{"Task": str(t), "Feedback": f"The prompt was not run: {why}.", "Reward": "0"} for t in batch]
            return EvaluationBatch(outputs=[None] * len(batch), scores=[0.0] * len(batch),
                                   trajectories=feedback if capture_traces else None)  # fmt: skip
        # Proposal minibatches (capture_traces) are training rollouts; full evaluations are validation.
        mode = RolloutMode.train if capture_traces else RolloutMode.val
        traces = self.wait(self._rollouts(text, batch, mode))
        cfg = algo.config
        records = [trace_record(t, cfg.perfect_score, cfg.max_chars, cfg.max_calls) for t in traces]
        return EvaluationBatch(outputs=[final_answer(t) for t in traces], scores=[t.reward for t in traces],
                               trajectories=records if capture_traces else None)  # fmt: skip

    def make_reflective_dataset(
        self, candidate: dict[str, str], eval_batch: Any, components_to_update: list[str]
    ) -> dict[str, list[dict[str, Any]]]:
        records = list(eval_batch.trajectories or [])
        return {name: records for name in components_to_update}


@dataclass
class GEPA(Algorithm):
    """gepa's reflective evolution over one prompt template of the agent.

    prompt_name / initial_prompt / llms: as APO (the prompt the agent reads from its `prompts`,
        its starting text, None = the latest published one). optimizer: the reflection LM
        (any OpenAI-compatible endpoint; None fields: the kiln server's own gateway and model).
    config: gepa's search settings (budget in rollouts, minibatch size, selection...).
    Proposals must keep the template's placeholders; gepa's reflection prompt says so, and a
    proposal that breaks them is scored 0 without running.
    val_data is gepa's valset (the Pareto front); without it, train_data is.
    """

    prompt_name: str = "system"
    initial_prompt: str | PromptTemplate | None = None
    config: GEPAConfig = field(default_factory=GEPAConfig)
    optimizer: OptimizerLLM = field(default_factory=lambda: OptimizerLLM(max_tokens=1000))
    llms: dict[str, LLMEndpoint] | None = None
    max_prompt_chars: int = 4000
    rollout_config: RolloutConfig = field(default_factory=default_rollout_config)

    async def _publish(self, run: Run, text: str, note: dict[str, Any]) -> str:
        return await publish_prompt(run, self._llms, self._prompts, self.prompt_name, self._template, text, note)

    def _reflection_lm(self, adapter: _Adapter, ctx: TrainingContext, client: Any) -> Any:
        def reflect(prompt: str | list[dict[str, Any]]) -> str:
            if not isinstance(prompt, str):  # a messages list (images): send its text
                prompt = "\n".join(str(p.get("text", "")) for m in prompt for p in (m.get("content") or [])
                                   if isinstance(p, dict))  # fmt: skip
            adapter.reflections += 1
            try:
                return adapter.wait(self.optimizer.ask(client, ctx, REFLECT_SYSTEM, prompt))
            except Exception as exc:  # gepa logs it and goes on; kept to report a reflection LM that never answered
                adapter.reflection_errors.append(f"{type(exc).__name__}: {exc}")
                raise

        return reflect

    async def run(
        self, ctx: TrainingContext, train_data: Sequence[Any], val_data: Sequence[Any] | None = None
    ) -> TrainingResult:
        import gepa
        from gepa.strategies.instruction_proposal import InstructionProposalSignature
        from gepa.utils import ScoreThresholdStopper

        if not train_data:
            raise ValueError("GEPA needs at least one training task")
        run = Run(ctx, "gepa", self.rollout_config)
        run.reset_history()
        self._llms, self._prompts, self._template = await base_resources(
            ctx, self.llms, self.prompt_name, self.initial_prompt
        )
        adapter = _Adapter(self, run, asyncio.get_running_loop())
        client = self.optimizer.client(ctx)
        cfg = self.config
        template = InstructionProposalSignature.default_prompt_template + (
            "\nThe instruction is a template the agent fills in." + placeholder_rule(self._template)
        )
        try:
            out = await asyncio.to_thread(
                gepa.optimize,
                seed_candidate={self.prompt_name: self._template.template},
                trainset=list(train_data),
                valset=list(val_data) if val_data else None,
                adapter=adapter,
                reflection_lm=self._reflection_lm(adapter, ctx, client),
                reflection_prompt_template=template,
                candidate_selection_strategy=cfg.candidate_selection,
                acceptance_criterion=cfg.acceptance,
                reflection_minibatch_size=min(cfg.reflection_minibatch_size, len(train_data)),
                use_merge=cfg.use_merge,
                perfect_score=cfg.perfect_score,
                skip_perfect_score=cfg.skip_perfect_score,
                max_metric_calls=cfg.max_metric_calls,
                # A prompt that scores perfect_score on every validation task cannot be beaten: stop there.
                stop_callbacks=[ScoreThresholdStopper(cfg.perfect_score)] if cfg.stop_at_perfect else None,
                logger=_Logger(),
                seed=cfg.seed,
                raise_on_exception=True,
            )
        finally:
            await client.close()
        errors = adapter.reflection_errors
        if errors and len(errors) == adapter.reflections:
            raise RuntimeError(f"the reflection LM failed on all {len(errors)} calls; last: {errors[-1]}")

        best_idx = out.best_idx
        best = out.candidates[best_idx][self.prompt_name]
        self.best = best
        final_id = await self._publish(run, best, {"candidate": best_idx, "best": True})
        history = [
            {"candidate": i, "prompt": c[self.prompt_name], "val_score": s, "parents": out.parents[i]}
            for i, (c, s) in enumerate(zip(out.candidates, out.val_aggregate_scores))
        ]
        for record in history:
            run.record("candidate", record)
        self._save(run, history, adapter.rejected, best, out.val_aggregate_scores[best_idx])
        result = run.result
        result.val_before = out.val_aggregate_scores[0]
        result.val_after = result.best_val = out.val_aggregate_scores[best_idx]
        result.elapsed_s = run.elapsed()
        result.extra.update(
            best_prompt=best, best_candidate=best_idx, final_resources_id=final_id,
            metric_calls=out.total_metric_calls, rejected=len(adapter.rejected),
            reflection_errors=len(adapter.reflection_errors),
        )  # fmt: skip
        return result

    def best_prompt(self) -> PromptTemplate:
        """The best template found by the last `run` (raises before any run)."""
        best = getattr(self, "best", None)
        if best is None:
            raise RuntimeError("GEPA has not run yet")
        return self._template.model_copy(update={"template": best})

    def _save(self, run: Run, history: list[dict[str, Any]], rejected: list[dict[str, Any]], best: str,
              score: float) -> None:  # fmt: skip
        (run.run_dir / HISTORY_FILE).write_text(json.dumps({"candidates": history, "rejected": rejected}, indent=2))
        (run.run_dir / BEST_FILE).write_text(json.dumps(
            {"name": self.prompt_name, "template": best, "engine": self._template.engine, "score": score}, indent=2))  # fmt: skip
