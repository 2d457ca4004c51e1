"""GEPA's search settings: the knobs of `gepa.optimize` that AgentKiln passes through."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GEPAConfig"]

SELECTIONS = ("pareto", "current_best", "epsilon_greedy", "top_k_pareto")
ACCEPTANCE = ("strict_improvement", "improvement_or_equal")


@dataclass
class GEPAConfig:
    """max_metric_calls: the budget, in rollouts (each task run under one candidate is one call).
    reflection_minibatch_size: training tasks run per proposal; their traces are the feedback.
    candidate_selection / acceptance / use_merge / perfect_score / skip_perfect_score: as in
    `gepa.optimize`. stop_at_perfect: end once a prompt's mean validation reward reaches
    perfect_score (gepa would otherwise spend the rest of the budget rerunning it). max_chars: each message, reply or error shown to the reflection LM is cut here;
    max_calls: LLM calls shown per rollout (the first and the last ones)."""

    max_metric_calls: int = 60
    reflection_minibatch_size: int = 3
    candidate_selection: str = "pareto"
    acceptance: str = "strict_improvement"
    use_merge: bool = False
    perfect_score: float = 1.0
    skip_perfect_score: bool = True
    stop_at_perfect: bool = True
    max_chars: int = 600
    max_calls: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_metric_calls < 1:
            raise ValueError(f"max_metric_calls must be at least 1, got {self.max_metric_calls}")
        if self.reflection_minibatch_size < 1:
            raise ValueError(f"reflection_minibatch_size must be at least 1, got {self.reflection_minibatch_size}")
        if self.candidate_selection not in SELECTIONS:
            raise ValueError(f"candidate_selection {self.candidate_selection!r}: use one of {', '.join(SELECTIONS)}")
        if self.acceptance not in ACCEPTANCE:
            raise ValueError(f"acceptance {self.acceptance!r}: use one of {', '.join(ACCEPTANCE)}")
        if self.max_chars < 1 or self.max_calls < 1:
            raise ValueError("max_chars and max_calls must be at least 1")
