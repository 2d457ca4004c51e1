"""`kiln demo --production`: the calculator agent deployed, learning from its users alone.

The agent is the same plain openai-SDK code as in `kiln demo`, but nothing creates rollouts for
it: it is "deployed" behind plain /v1 (each simulated user conversation sends an
`X-Kiln-Session` header, as a chat front end would), the server captures every call, and
simulated users post a thumbs up or down on the session, right with probability
`1 - noise`. Each round: serve traffic -> (if no canary runs) train a candidate offline from the
well-rated sessions so far (SFT on production data) -> publish it as a candidate -> a canary
serves it to a share of sessions -> the server's canary controller promotes or rolls it back
from the users' thumbs. Printed per round: the deployed version, its accuracy on its own
traffic and on a fixed validation set (greedy, calls with capture off, so they are not data).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from agentkiln.demo.agent import score, solve
from agentkiln.protocol import (
    CANARIES_PATH,
    ENGINE_STATUS_PATH,
    FEEDBACK_PATH,
    Headers,
    LLMCall,
    SpanNames,
    api_url,
    auth_headers,
    session_rollout_id,
)

log = logging.getLogger(__name__)

FEEDBACK_NAME = "thumbs"


@dataclass
class ProductionDemoConfig:
    rounds: int = 8
    sessions_per_round: int = 64
    users: int = 8  # concurrent conversations
    noise: float = 0.1  # chance a user's thumb is the wrong one
    temperature: float = 0.7  # the deployed agent samples, as deployed agents do
    canary_share: float = 0.5
    # The canary rule: with ~32 rated sessions per arm and round, lenient enough to promote a
    # candidate as good as the deployed one within a round or two, strict enough to roll back a
    # clearly worse one; no verdict after max_samples per arm rolls back (then retrain on more data).
    min_samples: int = 24
    max_samples: int = 64
    confidence: float = 0.8
    max_regression: float = 0.1
    algorithm: str = "grpo"  # off-policy GRPO on the thumbs (sft / dpo also work)
    lr: float = 2e-4
    epochs: int = 2
    val_size: int = 32
    seed: int = 0
    run_dir: Path = Path("runs/production-demo")
    model_dir: Optional[str] = None  # the served model's folder (None: SmolLM2)


@dataclass
class RoundReport:
    round: int
    deployed: str  # resources id serving the baseline arm
    deployed_version: str = ""  # "v3", as spans name it ("base": the base model's weights)
    sessions: int = 0
    accuracy: dict[str, float] = field(default_factory=dict)  # model version -> share of correct sessions
    thumbs_up: dict[str, float] = field(default_factory=dict)
    val_accuracy: Optional[float] = None  # deployed version, greedy, on the fixed validation set
    trained: Optional[dict[str, Any]] = None  # what the offline training used
    canary: Optional[str] = None  # what the canary did this round
    elapsed_s: float = 0.0


class ProductionDemo:
    """Drives one server (URL + admin key) as its users and its operator would."""

    def __init__(self, server: str, config: ProductionDemoConfig, *, api_key: Optional[str] = None,
                 model: str = "smollm2", train: Optional[Callable[..., dict[str, Any]]] = None,
                 on_round: Optional[Callable[[RoundReport], None]] = None) -> None:
        self.server = server.rstrip("/")
        self.config = config
        self.api_key = api_key
        self.model = model
        self.train = train  # (since, out_dir) -> {"adapter": path | None, ...}; default: production SFT
        self.on_round = on_round or (lambda report: None)
        self.rng = random.Random(config.seed)
        self.http = httpx.Client(headers=auth_headers(api_key), timeout=600)
        self.started = self.trained_until = time.time()  # feedback before trained_until is in some candidate

    # ------------------------------------------------------------------ users

    def _client(self, session_id: Optional[str], capture: bool = True) -> Any:
        from openai import OpenAI

        headers = {Headers.session: session_id} if session_id else {}
        if not capture:
            headers[Headers.capture] = "off"
        return OpenAI(base_url=self.server + "/v1", api_key=self.api_key or "unused", default_headers=headers,
                      max_retries=3, timeout=600)

    def _conversation(self, task: dict[str, Any], session_id: str, thumb_noise: float) -> dict[str, Any]:
        final = solve(self._client(session_id), self.model, task["question"], temperature=self.config.temperature)
        correct = score(task, final) == 1.0
        thumbs_up = correct if thumb_noise >= self.config.noise else not correct
        resp = self.http.post(self.server + FEEDBACK_PATH, json={
            "session_id": session_id, "name": FEEDBACK_NAME, "value": thumbs_up,
            "client_id": f"{session_id}:thumbs", "source": "simulated",
        })
        resp.raise_for_status()
        return {"session_id": session_id, "correct": correct, "thumbs_up": thumbs_up}

    def serve_round(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        jobs = [(self.rng.choice(tasks), f"demo-{uuid.uuid4().hex[:12]}", self.rng.random())
                for _ in range(self.config.sessions_per_round)]
        with concurrent.futures.ThreadPoolExecutor(self.config.users) as pool:
            results = list(pool.map(lambda job: self._conversation(*job), jobs))
        for result in results:
            result["version"] = self._served_by(result["session_id"])
        return results

    def _served_by(self, session_id: str) -> str:
        resp = self.http.get(api_url(self.server, f"/rollouts/{session_rollout_id(session_id)}/spans"),
                             params={"name": SpanNames.llm_call})
        resp.raise_for_status()
        versions = {LLMCall.from_attributes(s["attributes"]).model_version for s in resp.json()}
        return ",".join(sorted(v or "?" for v in versions))

    def validate(self, tasks: list[dict[str, Any]]) -> float:
        """Greedy accuracy of what serves a session outside any canary (capture off: not training data)."""

        def one(task: dict[str, Any]) -> float:
            return score(task, solve(self._client(None, capture=False), self.model, task["question"], temperature=0.0))

        with concurrent.futures.ThreadPoolExecutor(self.config.users) as pool:
            scores = list(pool.map(one, tasks))
        return sum(scores) / len(scores)

    # ------------------------------------------------------------------ operator

    def deployed(self) -> str:
        resp = self.http.get(api_url(self.server, "/resources/latest"))
        return resp.json().get("resources_id", "base") if resp.status_code == 200 and resp.json() else "base"

    def deployed_label(self) -> str:
        """The deployed version as spans name it: the engine's main model version."""
        return str(self.http.get(self.server + ENGINE_STATUS_PATH).json().get("model_version"))

    def active_canary(self) -> Optional[dict[str, Any]]:
        resp = self.http.get(f"{self.server}{CANARIES_PATH}/active")
        return resp.json() if resp.status_code == 200 else None

    def canary(self, canary_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{self.server}{CANARIES_PATH}/{canary_id}")
        resp.raise_for_status()
        return resp.json()

    def start_canary(self, candidate: str) -> dict[str, Any]:
        c = self.config
        resp = self.http.post(self.server + CANARIES_PATH, json={
            "candidate_resources_id": candidate, "share": c.canary_share,
            "rule": {"metric": FEEDBACK_NAME, "min_samples": c.min_samples, "max_samples": c.max_samples,
                     "confidence": c.confidence, "max_regression": c.max_regression},
        })
        resp.raise_for_status()
        return resp.json()

    def wait_for_engine(self, canary_id: Optional[str], deployed: str, timeout: float = 120) -> None:
        """Until the engine serves `deployed` (and the canary's candidate): else a round would measure the wrong weights."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.http.get(self.server + ENGINE_STATUS_PATH).json()
            ok = deployed == "base" or status.get("loaded_resources_id") == deployed
            if canary_id is not None:
                ok = ok and status.get("canary_id") == canary_id
            if ok:
                return
            time.sleep(0.5)
        raise TimeoutError(f"engine did not load {deployed} / canary {canary_id} in {timeout:.0f}s: {status}")

    # ------------------------------------------------------------------ the loop

    def deploy_base(self) -> None:
        """Version 1 = the base model, unless something is deployed already (a canary needs a baseline)."""
        if self.deployed() == "base":
            resp = self.http.post(api_url(self.server, "/resources"), json={
                "llms": {"main": {"model": self.model}}, "metadata": {"source": "production-demo", "base": True}})
            resp.raise_for_status()

    def run(self, tasks: list[dict[str, Any]], val_tasks: list[dict[str, Any]]) -> list[RoundReport]:
        self.deploy_base()
        reports = []
        canary_id: Optional[str] = None
        for round_no in range(self.config.rounds + 1):
            started = time.monotonic()
            deployed = self.deployed()
            report = RoundReport(round=round_no, deployed=deployed, deployed_version=self.deployed_label(), sessions=0)
            active = self.active_canary()
            canary_id = active["canary_id"] if active else None
            if active is None:  # no experiment running: measure what is deployed
                self.wait_for_engine(None, deployed)
                report.val_accuracy = self.validate(val_tasks)
            if round_no == self.config.rounds:
                report.elapsed_s = time.monotonic() - started
                reports.append(report)
                self.on_round(report)
                break
            if active is None and round_no > 0:
                report.trained = self._train_candidate(round_no)
                candidate = report.trained.get("resources_id")
                if candidate:
                    canary_id = self.start_canary(candidate)["canary_id"]
                    self.wait_for_engine(canary_id, deployed)
                    report.canary = f"started {canary_id} with {candidate}"
            results = self.serve_round(tasks)
            report.sessions = len(results)
            for version in sorted({r["version"] for r in results}):
                arm = [r for r in results if r["version"] == version]
                report.accuracy[version] = sum(r["correct"] for r in arm) / len(arm)
                report.thumbs_up[version] = sum(r["thumbs_up"] for r in arm) / len(arm)
            if canary_id is not None:
                decided = self._await_decision(canary_id)
                if decided:
                    report.canary = (report.canary + "; " if report.canary else "") + decided
            report.elapsed_s = time.monotonic() - started
            reports.append(report)
            self.on_round(report)
        return reports

    def _await_decision(self, canary_id: str, timeout: float = 30) -> Optional[str]:
        """The controller decides every few seconds once both arms have enough ratings."""
        deadline = time.monotonic() + timeout
        while True:
            canary = self.canary(canary_id)
            if canary["status"] != "active":
                last = canary["decisions"][-1]
                return f"{canary['status']} by {last['by']}: {last['reason']}"
            if time.monotonic() > deadline:
                return None
            time.sleep(1.0)

    def _train_candidate(self, round_no: int) -> dict[str, Any]:
        """A candidate from the feedback not trained on yet, starting from the deployed adapter."""
        out = self.config.run_dir / f"candidate-{round_no}"
        since, self.trained_until = self.trained_until, time.time()
        if self.train is not None:
            return self.train(since, out)
        return train_candidate(self.server, self.api_key, since, out, self.config)


def train_candidate(server: str, api_key: Optional[str], since: float, out: Path,
                    config: ProductionDemoConfig) -> dict[str, Any]:
    """`config.algorithm` on the rated production sessions since `since`, published as a
    candidate (agentkiln/production/train.py); returns the result's summary."""
    from agentkiln.production.train import train_from_production_url

    algo = config.algorithm
    settings: dict[str, Any] = {f"{algo}.lr": config.lr, "dataset.names": [FEEDBACK_NAME], "epochs": config.epochs}
    if algo == "grpo":  # as `kiln demo`'s GRPO: LoRA r16, no KL
        settings.update({"grpo.kl_coef": 0.0, "grpo.micro_batch_size": 8})
    if config.model_dir:
        settings["model_dir"] = config.model_dir
    result = asyncio.run(train_from_production_url(
        server, api_key=api_key, since=since, out_dir=out, algorithm=algo, publish=server, settings=settings,
    ))
    report = result["report"]
    return {"resources_id": result.get("resources_id"), "trained_on": result["trained_on"],
            "sessions": report.get("sessions"), "adapter": result.get("adapter"), "elapsed_s": result.get("elapsed_s")}
