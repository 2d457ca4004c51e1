"""The vLLM engine's parts without vLLM: spec parsing, the command line, versioned LoRA names,
the adapter registry, the request it sends (token ids in, our grammar), the model name it serves,
and the supervisor restarting a killed server and reloading its adapters (a stand-in server).
The real server is exercised by the slow tests (test_vllm_engine.py, test_vllm_training.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import httpx
import pytest

from agentkiln.engine.base import ChatRequest
from agentkiln.engine.constraints import grammar_ebnf, grammar_spec
from agentkiln.engine.errors import EngineError, EngineRequestError, EngineUnavailable
from agentkiln.engine.factory import build_engine
from agentkiln.engine.model_files import tiny_model_dir
from agentkiln.engine.upstream import UpstreamEngine
from agentkiln.engine.vllm import VLLMEngine, VLLMOptions
from agentkiln.engine.vllm.adapters import LoraAdapters, lora_name
from agentkiln.engine.vllm.process import VLLMServer, command

FAKE = Path(__file__).parent / "fake_vllm"
TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}]


def adapter_dir(root: Path, name: str) -> str:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return str(path)


def test_spec_options_are_parsed_and_checked(tmp_path):
    opts = VLLMOptions.parse(f"{tmp_path}?max_loras=2&max_cpu_loras=8&kv_cache_gb=1.5&arg=--enforce-eager&model_name=m")
    assert (opts.model_dir, opts.max_loras, opts.max_cpu_loras, opts.kv_cache_gb) == (tmp_path, 2, 8, 1.5)
    assert opts.extra_args == ["--enforce-eager"] and opts.model_name == "m"
    with pytest.raises(ValueError, match="unknown option"):
        VLLMOptions.parse(f"{tmp_path}?max_lora=2")
    with pytest.raises(ValueError, match="not a number"):
        VLLMOptions.parse(f"{tmp_path}?port=x")
    with pytest.raises(ValueError, match="not a model folder"):
        VLLMOptions.parse(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="max_cpu_loras"):
        VLLMOptions.parse(f"{tmp_path}?max_loras=8&max_cpu_loras=2")


def test_command_enables_runtime_lora_and_processed_logprobs(tmp_path):
    cmd = command(VLLMOptions(model_dir=tmp_path, model_name="m", python="py"), 9)
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in cmd and cmd[cmd.index("--served-model-name") + 1] == "m"
    assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"  # what the learner recomputes
    assert cmd[cmd.index("--dtype") + 1] in ("float32", "bfloat16")


def test_lora_names_are_versioned_per_folder_and_safe():
    assert lora_name(None, "v3", "/a").startswith("kiln-main-v3-")
    assert lora_name("w", "w@v4", "/a") != lora_name("w", "w@v4", "/b")
    assert all(c.isalnum() or c in "._-" for c in lora_name("candidate:a b", "x@1", "/p"))


class FakeAdmin:
    """Records LoRA admin calls; `status`/`text` set what it answers."""

    def __init__(self, status: int = 200, text: str = "Success") -> None:
        self.calls: list[tuple[str, dict]] = []
        self.status, self.text = status, text

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.calls.append((request.url.path, json.loads(request.content)))
            return httpx.Response(self.status, text=self.text)

        return httpx.MockTransport(handle)


async def test_registry_loads_new_version_then_unloads_the_superseded(tmp_path):
    admin = FakeAdmin()
    reg = LoraAdapters("http://vllm", transport=admin.transport())
    one, two = adapter_dir(tmp_path, "one"), adapter_dir(tmp_path, "two")
    await reg.load(None, one, "v1")
    first = reg.name_for(None)
    await reg.load(None, two, "v2")
    assert [p for p, _ in admin.calls] == ["/v1/load_lora_adapter", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"]
    assert admin.calls[1][1] == {"lora_name": reg.name_for(None), "lora_path": two}
    assert admin.calls[2][1] == {"lora_name": first} and reg.version_for(None) == "v2"
    await reg.load("writer", one, "writer@v2")
    admin.calls.clear()
    await reg.reload()
    assert sorted(b["lora_name"] for _, b in admin.calls) == sorted(a.name for a in reg.served.values())
    assert await reg.unload("writer") and not await reg.unload("writer")


async def test_registry_refuses_full_checkpoints_and_says_when_runtime_loading_is_off(tmp_path):
    reg = LoraAdapters("http://vllm", transport=FakeAdmin().transport())
    (tmp_path / "full").mkdir()
    with pytest.raises(EngineRequestError, match="not a LoRA adapter"):
        await reg.load(None, str(tmp_path / "full"), "v1")
    off = LoraAdapters("http://vllm", transport=FakeAdmin(404, "Not Found").transport())
    with pytest.raises(EngineError, match="cannot load adapters at run time"):
        await off.load(None, adapter_dir(tmp_path, "a"), "v1")
    assert off.served == {}  # nothing half-registered; the previous weights keep serving
    again = LoraAdapters("http://vllm", transport=FakeAdmin(400, "The lora adapter 'x' has already been loaded.").transport())
    await again.load(None, adapter_dir(tmp_path, "b"), "v1")
    assert again.version_for(None) == "v1"


async def test_registry_refuses_an_adapter_above_the_servers_max_rank(tmp_path):
    admin = FakeAdmin()
    reg = LoraAdapters("http://vllm", transport=admin.transport(), max_rank=16)
    wide = Path(adapter_dir(tmp_path, "wide"))
    (wide / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 32}}))
    with pytest.raises(EngineRequestError, match="rank-32 LoRA adapter .* max_lora_rank=16.*max_lora_rank=32"):
        await reg.load(None, str(wide), "v1")
    assert admin.calls == [] and reg.served == {}  # vLLM is never asked; the previous weights keep serving
    fits = Path(adapter_dir(tmp_path, "fits"))
    (fits / "adapter_config.json").write_text(json.dumps({"r": 16}))
    await reg.load(None, str(fits), "v1")
    assert reg.version_for(None) == "v1"
    assert VLLMOptions(model_dir=tmp_path).max_lora_rank == 16  # the learner's default rank, not vLLM's padding cost


def fake_vllm(seen: list[dict], answer_ids: list[int]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("_lora_adapter"):
            return httpx.Response(200, text="Success")
        body = json.loads(request.content)
        seen.append(body)
        choice = {"index": 0, "token_ids": answer_ids, "logprobs": {"token_logprobs": [-0.5] * len(answer_ids)}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice]})

    return httpx.MockTransport(handle)


@pytest.fixture(scope="module")
def tiny_dir():
    return tiny_model_dir()


async def test_engine_sends_our_prompt_ids_to_the_configured_model_and_parses_tools(tiny_dir, tmp_path):
    from agentkiln.engine.embedded import TransformersEngine

    embedded = TransformersEngine(tiny_dir, dtype="float32")
    seen: list[dict] = []
    call = '<tool_call>{"name": "calc", "arguments": {"x": "1+1"}}</tool_call>'
    ids = embedded.tokenizer(call, add_special_tokens=False)["input_ids"] + [embedded.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    engine = VLLMEngine(base_url="http://vllm/v1", model_dir=tiny_dir, served_model="base-m", model_name="kiln-m", transport=fake_vllm(seen, ids))
    request = ChatRequest(messages=[{"role": "user", "content": "1+1?"}], tools=TOOLS, model="gpt-4.1", temperature=1e-9, tool_choice="required")
    result = await engine.chat(request)
    body = seen[0]
    assert body["prompt"] == embedded.render(request).ids == result.prompt_ids  # our template, token ids in
    assert body["model"] == "base-m"  # whatever the agent asked for
    assert body["temperature"] == 0.0 and body["logprobs"] == 0 and body["return_token_ids"]
    # The embedded engine's grammar, as EBNF.
    assert body["structured_outputs"]["grammar"] == grammar_ebnf(grammar_spec(request))
    assert '"t" "o" "o" "l" "_" "c" "a" "l" "l"' in body["structured_outputs"]["grammar"]
    choice = result.choices[0]
    assert choice.tool_calls[0].name == "calc" and choice.finish_reason == "tool_calls" and choice.constrained
    assert result.model == "kiln-m" and result.model_version == "base"
    # A published adapter: calls go to its versioned name and record its version.
    await engine.load_weights(adapter_dir(tmp_path, "a"), "v2")
    result = await engine.chat(request.model_copy(update={"tool_choice": None}))
    assert seen[-1]["model"].startswith("kiln-main-v2-") and result.model_version == "v2"
    await engine.load_weights(str(tiny_dir), "v3")  # the base folder: the base model again
    await engine.chat(request)
    assert seen[-1]["model"] == "base-m" and engine.model_version == "v3"
    await engine.close()
    await embedded.close()


async def test_engine_answers_503_while_its_server_restarts(tiny_dir):
    server = VLLMServer(VLLMOptions(model_dir=tiny_dir, python="/nonexistent"))
    engine = VLLMEngine(base_url=server.base_url, model_dir=tiny_dir, served_model="m", server=server)
    with pytest.raises(EngineUnavailable) as err:
        await engine.chat(ChatRequest(messages=[{"role": "user", "content": "hi"}]))
    assert err.value.status_code == 503 and err.value.retry_after_s > 0


async def test_upstream_serves_the_configured_model_whatever_the_agent_asks():
    seen: list[dict] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "ok"}, "token_ids": [1], "logprobs": {"content": [{"logprob": -1}]}}], "prompt_token_ids": [1]})

    engine = UpstreamEngine("http://u/v1", model="smollm2", transport=httpx.MockTransport(handle), model_aliases={"gpt-4.1-mini": "mini-lora"})
    for asked in ("gpt-4.1", None, "gpt-4.1-mini"):
        await engine.chat(ChatRequest(messages=[{"role": "user", "content": "x"}], model=asked))
    assert [b["model"] for b in seen] == ["smollm2", "smollm2", "mini-lora"]
    await engine.close()


def test_factory_specs_for_vllm(tiny_dir, monkeypatch):
    engine = build_engine(f"vllm:{tiny_dir}?max_loras=2")
    assert isinstance(engine, VLLMEngine) and engine.server is not None and engine.server.options.max_loras == 2
    attached = build_engine(f"upstream:http://h:1/v1#served?model_dir={tiny_dir}")
    assert isinstance(attached, VLLMEngine) and attached.server is None and attached.served_model == "served"
    forwarded = build_engine("upstream:http://h:1/v1#m?alias=gpt-4.1&alias=a:b")
    assert isinstance(forwarded, UpstreamEngine) and forwarded.model_aliases == {"gpt-4.1": "gpt-4.1", "a": "b"}
    with pytest.raises(ValueError, match="unknown option"):
        build_engine("upstream:http://h:1/v1#m?model=x")


async def test_supervisor_restarts_a_killed_server_and_reloads_adapters(tiny_dir, tmp_path, monkeypatch):
    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(record))
    monkeypatch.setenv("FAKE_VLLM_PYTHON", sys.executable)
    engine = VLLMEngine.managed(VLLMOptions(model_dir=tiny_dir, model_name="m", python=str(FAKE / "python")), tmp_path / "v.log")
    await engine.start()
    try:
        adapter = adapter_dir(tmp_path, "a")
        await engine.load_weights(adapter, "v2")
        first = engine.server.pid
        os.kill(first, signal.SIGKILL)
        for _ in range(200):  # the supervisor notices, restarts, reloads; calls get 503 meanwhile
            if engine.server.restarts == 1 and engine.server.ready:
                break
            await asyncio.sleep(0.05)
        assert engine.server.restarts == 1 and engine.server.pid != first
        loads = [json.loads(line) for line in record.read_text().splitlines()]
        assert [c["pid"] for c in loads] == [first, engine.server.pid]
        assert {c["lora_name"] for c in loads} == {engine.served_name(None)} and engine.model_version == "v2"
        assert engine.status()["vllm_restarts"] == 1
    finally:
        pid = engine.server.pid
        await engine.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
