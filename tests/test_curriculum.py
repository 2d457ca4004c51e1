"""Curriculum sampler: weights by measured success rate, determinism, persistence, GRPO hook."""

from __future__ import annotations

from collections import Counter

from agentkiln.algorithms.curriculum import Curriculum, default_task_key

TASKS = [{"id": f"t{i}"} for i in range(6)]


def test_weights_prefer_learnable_tasks_and_revisit_others() -> None:
    cur = Curriculum(decay=1.0, min_weight=0.05)
    cur.record(TASKS[0], [1, 1, 1, 1])  # solved
    cur.record(TASKS[1], [0, 0, 0, 0])  # hopeless for now
    cur.record(TASKS[2], [1, 0, 1, 0])  # p = 0.5: the most GRPO signal
    cur.record(TASKS[3], [1, 0, 0, 0])  # p = 0.25
    assert cur.weight(TASKS[0]) == cur.weight(TASKS[1]) == 0.05
    assert cur.weight(TASKS[2]) == 1.0
    assert 0.05 < cur.weight(TASKS[3]) < 1.0
    assert cur.weight(TASKS[4]) == cur.unseen_weight
    assert cur.summary() == {"seen": 4.0, "learnable": 2.0, "solved": 1.0, "failing": 1.0}


def test_sampling_follows_weights_without_replacement() -> None:
    cur = Curriculum(seed=3, decay=1.0, unseen_weight=0.05)
    cur.record(TASKS[0], [1, 0])
    cur.record(TASKS[1], [1, 1])
    counts: Counter[int] = Counter()
    for _ in range(400):
        picked = cur.sample(TASKS, 2)
        assert len(set(picked)) == 2
        counts.update(picked)
    assert counts[0] > 0.9 * 400  # the learnable task is nearly always drawn
    assert counts.most_common(1)[0][0] == 0
    assert all(counts[i] > 0 for i in range(6))  # low-weight tasks are still revisited
    assert cur.sample(TASKS[:1], 5) == [0]


def test_deterministic_for_a_seed_and_resumable(tmp_path) -> None:
    def run(cur: Curriculum, n: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            picked = cur.sample(TASKS, 2)
            for i in picked:
                cur.record(TASKS[i], [1.0 if i % 2 else 0.0, 1.0])
            out.append(picked)
        return out

    a, b = Curriculum(seed=7), Curriculum(seed=7)
    assert run(a, 5) == run(b, 5)
    assert run(Curriculum(seed=8), 5) != run(Curriculum(seed=7), 5)

    full = run(Curriculum(seed=1), 6)
    first = Curriculum(seed=1)
    head = run(first, 3)
    first.save(tmp_path / "c.json")
    resumed = Curriculum(seed=1)
    resumed.load(tmp_path / "c.json")
    assert head + run(resumed, 3) == full


def test_decay_lets_a_solved_task_become_learnable_again() -> None:
    cur = Curriculum(decay=0.5)
    cur.record(TASKS[0], [1, 1, 1, 1])
    assert cur.weight(TASKS[0]) == cur.min_weight
    cur.record(TASKS[0], [0, 0, 0, 0])
    assert cur.stats["t0"].rate == 2 / 6
    assert cur.weight(TASKS[0]) > 0.5


def test_task_key() -> None:
    assert default_task_key({"id": 3, "q": "x"}) == "3"
    assert default_task_key({"q": "x", "a": 1}) == default_task_key({"a": 1, "q": "x"})
    assert default_task_key("x") != default_task_key("y")


def test_grpo_uses_the_curriculum(tmp_path, monkeypatch) -> None:
    """GRPO draws its tasks from the curriculum and records each group's rewards in it."""
    import asyncio

    from agentkiln.algorithms.grpo import GRPO
    from agentkiln.store import InMemoryStore
    from agentkiln.training import loop as grpo_algorithm
    from agentkiln.training.context import TrainingContext

    drawn: list[str] = []

    async def fake_run_rollouts(store, tasks, **kw):
        drawn.extend(t["id"] for t in tasks)
        return [_Outcome(1.0 if t["id"] in ("t0", "t1") and s == 0 else 0.0)
                for t in tasks for s in range(kw["samples_per_task"])]

    class _Learner:
        step = 0

        def save(self, path):
            path.mkdir(parents=True, exist_ok=True)
            return path

        def checkpoint(self, path):
            return path

    async def no_learn(self, learner, outcomes):
        return {"transitions": 0.0}

    cur = Curriculum(seed=0, unseen_weight=1e-6)  # unseen tasks almost never drawn once t0/t1 are known
    cur.record(TASKS[0], [1, 0])
    cur.record(TASKS[1], [1, 0])
    algo = GRPO(steps=4, tasks_per_step=2, samples_per_task=2, curriculum=cur, resume=False)
    algo._learner = lambda: _Learner()  # type: ignore[method-assign]
    monkeypatch.setattr(grpo_algorithm, "run_rollouts", fake_run_rollouts)
    monkeypatch.setattr(GRPO, "_learn", no_learn)

    async def go():
        ctx = TrainingContext(store=InMemoryStore(), server_url="http://unused", run_dir=tmp_path)
        ctx.wait_for_resources_served = _noop  # type: ignore[method-assign]
        return await algo.run(ctx, TASKS)

    asyncio.run(go())
    assert sorted(drawn) == ["t0"] * 4 + ["t1"] * 4
    assert cur.stats["t0"].n > 2 and (tmp_path / "curriculum.json").exists()


async def _noop(*args, **kwargs) -> None:
    return None


class _Outcome:
    def __init__(self, reward: float) -> None:
        self.reward = reward

    def latest_spans(self) -> list:  # as Trace: the loop counts the sampled tokens in them
        return []

    def reward_names(self) -> set[str]:  # as Trace: the loop reports named rewards besides primary
        return {"primary"}
