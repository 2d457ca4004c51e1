"""The dashboard in a real browser: Playwright drives Debian's Chromium against a server holding a real run.

The run is made here: a Trainer (GRPO, tiny random-init model, SQLite store) trains two steps
with report_to="tensorboard", then a rollout fails with a tool error. A fresh server on the same
store (tiny engine, run folder attached) serves the dashboard. Screenshots go to the test's tmp folder.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

import agentkiln as kiln
from agentkiln.adapter.credit import CreditConfig
from agentkiln.algorithms.grpo import GRPO, GRPOConfig, LoraSettings
from agentkiln.demo.agent import CALCULATOR_TOOL, FEW_SHOT, calculator_agent
from agentkiln.demo.tasks import make_tasks
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.runner.runner import Runner
from agentkiln.runner.worker import WorkerConfig
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store import SqliteStore
from agentkiln.trainer import Trainer

CHROMIUM = "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = [
    pytest.mark.slow,  # the training run in the fixture takes about a minute on two cores
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)"),
]
FAST = WorkerConfig(poll_interval_s=0.05, heartbeat_s=0.2, flush_interval_s=0.05, cancel_grace_s=0.5)
TIMEOUT_MS = 20_000


@kiln.tool
def broken_calculator(expression: str) -> str:
    raise ZeroDivisionError(f"cannot evaluate {expression!r}")


@kiln.rollout
def tool_failing_agent(task: Any, llm: Any) -> float:
    """One LLM call with a tool conversation, then a tool that raises: the attempt fails as tool_error."""
    client = OpenAI(base_url=llm.base_url, api_key=llm.api_key, max_retries=0, timeout=120)
    messages = [
        {"role": "system", "content": "Use the calculator."},
        *FEW_SHOT[:3],
        {"role": "user", "content": task["question"]},
    ]
    client.chat.completions.create(model=llm.model, messages=messages, tools=[CALCULATOR_TOOL], max_tokens=4)
    broken_calculator("17 / 0")
    return 1.0


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from agentkiln.engine.embedded import TransformersEngine

    root = tmp_path_factory.mktemp("dashboard")
    db, run_dir = root / "kiln.db", root / "run"
    algorithm = GRPO(
        model_dir=str(tiny_model_dir()),
        steps=2,
        tasks_per_step=1,
        samples_per_task=2,
        eval_every=1,
        config=GRPOConfig(lr=1e-3, lora=LoraSettings(r=4, alpha=8), bf16=False),
        credit=CreditConfig(scale_by_std=False),
    )
    Trainer(
        algorithm, n_runners=2, store=f"sqlite:///{db}", engine="tiny", run_dir=run_dir, report_to="tensorboard"
    ).fit(calculator_agent, make_tasks(4, seed=1), make_tasks(1, seed=2))

    engine = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32", num_threads=1)
    store = SqliteStore(db, sweep_interval_s=None)
    app = create_app(store, sweep_interval_s=0, engine=engine, model_sync_interval_s=0)
    app.state.run_dirs = [run_dir]
    thread = ServerThread(app)
    url = thread.start()
    failing = asyncio.run(store.enqueue_rollout({"question": "What is 17 / 0?"}, mode="test"))
    assert (
        asyncio.run(Runner(tool_failing_agent, url, n_workers=1, mode="thread", until_empty=True, config=FAST).arun())
        == 1
    )
    try:
        yield {"url": url, "run_dir": run_dir, "failing": failing.rollout_id, "store": store}
    finally:
        thread.stop()
        asyncio.run(engine.close())
        asyncio.run(store.close())


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.errors = []  # console errors and uncaught exceptions
    pg.on("console", lambda m: pg.errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.shots = tmp_path / "screenshots"
    pg.shots.mkdir()
    yield pg
    context.close()


def shot(page, name: str) -> None:
    page.screenshot(path=str(page.shots / f"{name}.png"), full_page=True)


def canvas_painted(page, selector: str) -> bool:
    return page.eval_on_selector(
        f"{selector} canvas",
        "c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true; return false; }",
    )


def test_tensorboard_events_written_by_the_run(served):
    events = list((served["run_dir"] / "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 100 for e in events)


def test_every_page_loads_without_console_errors(served, page):
    url = served["url"]
    page.goto(url + "/")
    page.wait_for_selector("#queue-depth")
    page.wait_for_selector("#failures td:text('tool_error')")
    shot(page, "overview")
    page.goto(url + "/resources")
    page.wait_for_selector("#versions tbody tr")
    assert page.locator("#versions tbody tr").count() >= 4  # base, one per step, best
    shot(page, "resources")
    page.goto(url + f"/rollout?id={served['failing']}")
    page.wait_for_selector("#attempts td:text('tool_error')")
    assert "cannot evaluate" in page.inner_text("#attempts")
    page.wait_for_selector("#timeline .bar.err")  # the failed tool call
    shot(page, "failed-rollout")
    assert page.errors == []


def test_reward_chart_renders_and_a_live_run_gains_a_point(served, page):
    page.goto(served["url"] + "/runs")
    chart = page.wait_for_selector("#reward-chart[data-points='2']")  # steps 1 and 2
    assert chart.query_selector("canvas") is not None and canvas_painted(page, "#reward-chart")
    page.wait_for_selector("#rollout-chart[data-points='2']")  # the store's train rollouts, steps 1 and 2
    shot(page, "run")
    # The run goes on: the training loop appends the next step's record to history.jsonl.
    history = served["run_dir"] / "history.jsonl"
    last = json.loads(history.read_text().splitlines()[-1])
    try:
        with history.open("a") as fh:
            fh.write(json.dumps({**last, "step": last["step"] + 1, "train_reward": 0.5}) + "\n")
        page.wait_for_selector("#reward-chart[data-points='3']")
        page.wait_for_selector("#run-steps .value:text('3')")
        shot(page, "run-live")
    finally:
        history.write_text("".join(line + "\n" for line in history.read_text().splitlines()[:-1]))  # as the run left it
    assert page.errors == []


def test_failure_filter_narrows_the_table_and_a_rollout_shows_its_conversation(served, page):
    page.goto(served["url"] + "/rollouts")
    page.wait_for_selector("#rollouts tbody tr")
    total = page.locator("#rollouts tbody tr").count()
    assert total > 1
    page.select_option("select[name=failure_kind]", "tool_error")
    page.wait_for_selector("#rollouts[data-rows='1']")
    assert served["failing"] in page.inner_text("#rollouts")
    assert "failure_kind=tool_error" in page.url  # the filter is in the link
    shot(page, "rollouts-filtered")
    page.select_option("select[name=failure_kind]", "")
    page.select_option("select[name=mode]", "train")
    page.wait_for_function("document.querySelector('#rollouts').dataset.rows === '4'")  # 2 steps x 1 task x 2 samples
    page.locator("#rollouts a.rollout-link").first.click()
    page.wait_for_url(re.compile(r"/rollout\?id="))
    page.wait_for_selector("#conversations .tool-call")
    assert "calculator" in page.inner_text("#conversations")
    assert page.locator("#conversations .msg.tool").count() >= 1  # tool results
    page.wait_for_selector("#calls .tok")  # per-token logprobs
    assert page.locator("#calls .tag.ok, #calls .tag.skip").count() >= 1  # transition or why not
    shot(page, "rollout")
    assert page.errors == []


def test_with_a_key_the_login_form_keeps_it_for_the_session(served, browser, tmp_path):
    app = create_app(served["store"], api_key="dash-key", sweep_interval_s=0)
    thread = ServerThread(app)
    url = thread.start()
    context = browser.new_context()
    try:
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(url + "/rollouts")
        pg.wait_for_selector("#login[open]")
        pg.fill("#login-key", "dash-key")
        pg.click("#login button[type=submit]")
        pg.wait_for_selector("#rollouts tbody tr")
        assert pg.evaluate("sessionStorage.getItem('kiln.apiKey')") == "dash-key"
        pg.screenshot(path=str(tmp_path / "login.png"))
    finally:
        context.close()
        thread.stop()
