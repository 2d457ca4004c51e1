"""Published weights load only from local safetensors folders under the server's allowed roots."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from agentkiln.engine.embedded import TransformersEngine
from agentkiln.engine.model_files import load_model, tiny_model_dir
from agentkiln.engine.weight_roots import ROOTS_ENV, WeightsPolicy, WeightsRefused
from agentkiln.engine.weight_sync import ModelSync
from agentkiln.models import LLMEndpoint, ResourcesIn
from agentkiln.server.app import create_app
from agentkiln.server.serve import ServerThread
from agentkiln.store.client import HttpStore
from agentkiln.store.memory import InMemoryStore
from agentkiln.training.context import TrainingContext

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _save_adapter(path: Path, safetensors: bool = True) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = get_peft_model(
        load_model(tiny_model_dir(), "float32"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(path, safe_serialization=safetensors)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A run dir (the allowed root) with a good adapter, a pickle adapter, and a good adapter outside it."""
    base = tmp_path_factory.mktemp("weights")
    run, outside = base / "run", base / "outside"
    good = _save_adapter(run / "adapters" / "step-1")
    bin_adapter = _save_adapter(run / "adapters" / "pickled", safetensors=False)
    stray = _save_adapter(outside / "adapter")
    (run / "adapters" / "escape").symlink_to(outside / "adapter", target_is_directory=True)
    return {"run": run, "good": good, "bin": bin_adapter, "outside": stray}


@pytest.fixture(scope="module")
def engine():
    eng = TransformersEngine(tiny_model_dir(), model_name="tiny", dtype="float32")
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(autouse=True)
def _no_env_roots(monkeypatch):
    monkeypatch.delenv(ROOTS_ENV, raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection beyond loopback fails the test (a hub id must be refused before any fetch)."""
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in ("127.0.0.1", "::1", "localhost"):
            attempts.append(address)
            raise OSError(f"test: network access to {address} attempted")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the refusal must not rely on offline mode
    yield attempts


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)


def _policy(folders, **kw) -> WeightsPolicy:
    return WeightsPolicy.build([folders["run"]], env={}, **kw)


async def _publish(store, main: str | None = None, **agents: str) -> str:
    llms = {"main": LLMEndpoint(model="tiny", adapter_path=main)}
    llms.update({a: LLMEndpoint(model="tiny", adapter_path=p, agent=a) for a, p in agents.items()})
    return (await store.add_resources(ResourcesIn(llms=llms))).resources_id


# --------------------------------------------------------------------------- the path check


def test_paths_outside_the_roots_are_refused(folders):
    policy = _policy(folders)
    assert policy.check(folders["good"]) == Path(os.path.realpath(folders["good"]))
    dotdot = str(folders["run"] / "adapters" / ".." / ".." / "outside" / "adapter")
    for path in (folders["outside"], dotdot, str(folders["run"] / "adapters" / "escape")):
        with pytest.raises(WeightsRefused, match="outside the allowed roots"):
            policy.check(path)
    with pytest.raises(WeightsRefused, match="no weights roots"):
        WeightsPolicy.build(env={}).check(folders["good"])


def test_a_symlinked_file_out_of_the_root_is_refused(folders, tmp_path):
    adapter = folders["run"] / "linked-file"
    adapter.mkdir(exist_ok=True)
    for f in Path(folders["good"]).iterdir():
        target = Path(folders["outside"]) / "adapter" / f.name if f.name.endswith(".safetensors") else f
        (adapter / f.name).unlink(missing_ok=True)
        (adapter / f.name).symlink_to(target)
    with pytest.raises(WeightsRefused, match="links outside"):
        _policy(folders).check(str(adapter))


def test_hub_ids_and_pickles_are_refused(folders, tmp_path, monkeypatch):
    policy = _policy(folders)
    monkeypatch.chdir(folders["run"])  # a hub id reads as a relative path under the root
    with pytest.raises(WeightsRefused, match="not a local folder"):
        policy.check(HUB_ID)
    with pytest.raises(WeightsRefused, match=r"pickle-format files \(adapter_model.bin\)"):
        policy.check(folders["bin"])
    weights_file = folders["run"] / "model.pt"
    weights_file.write_bytes(b"not really")
    with pytest.raises(WeightsRefused, match="a file"):
        policy.check(str(weights_file))


def test_roots_from_flags_env_and_default(tmp_path):
    env = {ROOTS_ENV: os.pathsep.join([str(tmp_path / "a"), str(tmp_path / "b")])}
    assert WeightsPolicy.build([tmp_path / "c"], env=env).roots == (tmp_path / "c", tmp_path / "a", tmp_path / "b")
    assert WeightsPolicy.build(env={}, default="runs").roots == (Path("runs").absolute(),)
    assert WeightsPolicy.build(env=env, default="runs").roots == (tmp_path / "a", tmp_path / "b")


def test_kiln_serve_passes_roots_and_cap(monkeypatch, tmp_path):
    import agentkiln.cli.serve  # noqa: F401  (adds the command)
    from agentkiln.cli.app import app

    seen = {}
    monkeypatch.setattr("agentkiln.server.serve.serve", lambda store, **kw: seen.update(kw))
    args = ["serve", "--engine", "none", "--weights-root", str(tmp_path / "a"), "--weights-root", "b"]
    result = CliRunner().invoke(app, [*args, "--max-weight-sets", "3"])
    assert result.exit_code == 0, result.output
    assert [str(p) for p in seen["weights_roots"]] == [str(tmp_path / "a"), "b"] and seen["max_weight_sets"] == 3


def test_serve_goes_offline_before_opening_anything(monkeypatch):
    from agentkiln.server import serve as serve_mod

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    async def stop(url):
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve_mod, "open_store_async", stop)
    with pytest.raises(RuntimeError, match="stop here"):
        asyncio.run(serve_mod.serve_async("memory://"))
    assert os.environ["HF_HUB_OFFLINE"] == "1"


# --------------------------------------------------------------------------- the engine refuses too


def test_weight_sets_never_unpickle_nor_fetch(engine, folders, no_network, no_unpickling):
    """Defence in depth: engine.load_weights itself refuses a pickle adapter and a hub id."""
    for path in (folders["bin"], HUB_ID):
        with pytest.raises(WeightsRefused):
            asyncio.run(engine.load_weights(path, "x", agent="writer"))
    assert engine.agent_versions == {} and no_network == []


# --------------------------------------------------------------------------- the sync loop


async def test_model_sync_loads_under_the_run_dir_and_refuses_the_rest(engine, folders, no_network, caplog):
    store = InMemoryStore(sweep_interval_s=None)
    sync = ModelSync(store, engine, policy=_policy(folders))
    try:
        good = await _publish(store, writer=folders["good"])
        assert await sync.sync_once() and sync.loaded_resources_id == good
        assert engine.agent_versions == {"writer": "writer@v1"} and sync.last_error is None

        bad_paths = {
            "outside": folders["outside"],
            "dotdot": str(folders["run"] / ".." / "outside" / "adapter"),
            "symlink": str(folders["run"] / "adapters" / "escape"),
            "hub": HUB_ID,
            "pickle": folders["bin"],
        }
        for name, path in bad_paths.items():
            caplog.clear()
            with caplog.at_level(logging.ERROR, logger="agentkiln.engine.weight_sync"):
                bad = await _publish(store, writer=folders["good"], critic=path)
                for _ in range(3):  # polled again and again, refused and logged once
                    assert not await sync.sync_once()
            assert len(caplog.records) == 1 and "still serving the previous weights" in caplog.text, name
            assert set(sync.agent_weights_errors) == {"critic"} and sync.refused_resources_id == bad, name
            assert sync.loaded_resources_id == good and bad in sync.last_error
            assert engine.agent_versions == {"writer": "writer@v1"}, name  # nothing of it was loaded
        assert no_network == []

        main_bad = await _publish(store, main=folders["outside"])
        assert not await sync.sync_once()
        assert "outside the allowed roots" in sync.weights_error and engine.model_version == "base"
        assert engine.agent_versions == {"writer": "writer@v1"}

        fixed = await _publish(store, writer=folders["good"], critic=folders["good"])
        assert await sync.sync_once() and sync.loaded_resources_id == fixed != main_bad
        assert sync.last_error is None and sync.agent_weights_errors == {} and sync.weights_error is None
        assert engine.agent_versions == {"writer": "writer@v1", "critic": "critic@v8"}
    finally:
        for agent in list(engine.agent_versions):
            await engine.unload_weights(agent)


async def test_the_cap_on_weight_sets_refuses_the_whole_version(engine, folders):
    store = InMemoryStore(sweep_interval_s=None)
    sync = ModelSync(store, engine, policy=_policy(folders, max_weight_sets=2))
    try:
        await _publish(store, a=folders["good"], b=folders["good"], c=folders["good"])
        assert not await sync.sync_once()
        assert engine.agent_versions == {} and set(sync.agent_weights_errors) == {"a", "b", "c"}
        assert "at most 2" in sync.agent_weights_errors["a"]
        await _publish(store, a=folders["good"], b=folders["good"])
        assert await sync.sync_once() and set(engine.agent_versions) == {"a", "b"}
    finally:
        for agent in list(engine.agent_versions):
            await engine.unload_weights(agent)


# --------------------------------------------------------------------------- the server


async def test_server_refuses_bad_publishes_and_keeps_serving(engine, folders):
    store = InMemoryStore(sweep_interval_s=None)
    app = create_app(store, sweep_interval_s=0, model_sync_interval_s=0.05, weights_policy=_policy(folders))
    app.state.engine = engine
    server = ServerThread(app)
    url = server.start()
    try:
        async with HttpStore(url) as client, httpx.AsyncClient(base_url=url) as http:
            ctx = TrainingContext(store=client, server_url=url, run_dir=folders["run"])
            good = await _publish(client, main=folders["good"])
            await ctx.wait_for_resources_served(good, timeout=60)

            # Through the API a bad publish is refused before it is stored.
            body = ResourcesIn(llms={"main": LLMEndpoint(model="tiny", adapter_path=folders["outside"])})
            answer = await http.post("/api/v1/resources", json=body.model_dump(mode="json"))
            assert answer.status_code == 422 and "outside the allowed roots" in answer.json()["error"]["message"]
            assert (await client.get_latest_resources()).resources_id == good

            # Written to the store some other way, it is refused at load time; the old weights serve on.
            bad = await _publish(store, main=folders["bin"])
            with pytest.raises(RuntimeError, match="pickle-format"):
                await ctx.wait_for_resources_served(bad, timeout=10)
            status = await ctx.engine_status()
            assert status["refused_resources_id"] == bad and "pickle-format" in status["weights_error"]
            assert status["loaded_resources_id"] == good and status["model_version"] == "v1"
            chat = await http.post(
                "/v1/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            )
            assert chat.status_code == 200
    finally:
        server.stop()
        await engine.load_weights(str(tiny_model_dir()), "base")


def test_trainer_serves_weights_from_its_run_dir(tmp_path):
    from agentkiln.trainer import Trainer

    trainer = Trainer(algorithm=None, engine="none", run_dir=tmp_path / "run")  # type: ignore[arg-type]
    trainer.start_server()
    try:
        assert trainer._server.app.state.weights_policy.roots == (tmp_path / "run",)
    finally:
        trainer.stop_server()
