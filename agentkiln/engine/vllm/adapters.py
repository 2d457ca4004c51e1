"""Which LoRA adapter each weight set is served by in a vLLM server, under versioned names.

vLLM serves a runtime-loaded adapter under the model name it was loaded as
(`POST /v1/load_lora_adapter {"lora_name", "lora_path"}`, needs VLLM_ALLOW_RUNTIME_LORA_UPDATING).
Every published version gets its own name (`kiln-main-v3-<digest of its folder>`), so a call
routed to a name is served exactly the weights of that version and never a half-swapped mix, and
two trainers sharing one attached server never collide on a name.
The new name is loaded first and routed to, then the superseded one is unloaded, so the server
holds one adapter per live weight set (main, each agent's, a canary's candidates) and stays
within its `--max-cpu-loras`. After a vLLM restart `reload` loads every served adapter again.

A server that does not allow runtime loading answers 404 (no such route) or 400 (disabled):
`load` then raises a clear EngineError saying so, and the previous weights keep serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import httpx

from agentkiln.engine.errors import EngineError, EngineRequestError, EngineUnavailable
from agentkiln.production.assignment import weight_set_key

log = logging.getLogger(__name__)

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_ADMIN_TIMEOUT_S = 120.0  # an adapter load reads and shards its weights: seconds on a large model


@dataclass(frozen=True)
class ServedAdapter:
    name: str
    path: str
    version: str


def lora_name(key: str | None, version: str, path: str) -> str:
    """The vLLM model name of weight set `key`'s version (key None: the main weights) loaded from `path`."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    return _NAME_UNSAFE.sub("_", f"kiln-{key or 'main'}-{version}-{digest}")


def is_lora_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_rank(path: str | Path) -> int | None:
    """The largest LoRA rank in a peft adapter's config (`r` and any per-module `rank_pattern`); None if unreadable."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks = [int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return max(ranks)


class LoraAdapters:
    """The adapters loaded into one vLLM server, keyed like the embedded engine's weight sets."""

    def __init__(
        self,
        root_url: str,
        headers: dict[str, str] | None = None,
        max_adapters: int = 16,
        transport: httpx.AsyncBaseTransport | None = None,
        max_rank: int | None = None,
    ) -> None:
        """`max_rank`: the server's --max-lora-rank when kiln started it (None: unknown, vLLM's own 400
        is passed on); `transport` replaces the network (tests)."""
        self.root_url = root_url.rstrip("/")
        self.transport = transport
        self.headers = dict(headers or {})
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.served: dict[str | None, ServedAdapter] = {}

    def key_for(self, agent: str | None, variant: str | None) -> str | None:
        """The weight set serving `agent` (for a canary candidate: its own set, else the candidate's main one)."""
        return weight_set_key(agent, variant, self.served)

    def name_for(self, key: str | None) -> str | None:
        adapter = self.served.get(key)
        return adapter.name if adapter is not None else None

    def version_for(self, key: str | None) -> str | None:
        adapter = self.served.get(key)
        return adapter.version if adapter is not None else None

    async def load(self, key: str | None, path: str, version: str) -> None:
        """Serve `path` as weight set `key`'s version `version`, then unload what it supersedes."""
        if not is_lora_adapter(path):
            raise EngineRequestError(
                f"{path} is not a LoRA adapter (no adapter_config.json): a vLLM engine serves trained weights "
                "as LoRA adapters; train with LoRA (the default) or serve full checkpoints with the embedded engine"
            )
        self._check_rank(path)
        old = self.served.get(key)
        if old is not None and old.path == path and old.version == version:
            return
        if old is None and len(self.served) >= self.max_adapters:
            raise EngineRequestError(f"vLLM holds {self.max_adapters} adapters already (its max-cpu-loras)")
        resolved = str(Path(path).resolve())
        adapter = ServedAdapter(lora_name(key, version, resolved), resolved, version)
        await self._post("/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})
        self.served[key] = adapter
        log.info("vLLM serves %s as %s (version %s)", adapter.path, adapter.name, version)
        if old is not None and old.name != adapter.name:
            await self._unload(old.name)

    def _check_rank(self, path: str) -> None:
        """Refuse an adapter above the server's max rank before vLLM does, saying which option to raise."""
        if self.max_rank is None:
            return
        rank = adapter_rank(path)
        if rank is not None and rank > self.max_rank:
            raise EngineRequestError(
                f"{path} is a rank-{rank} LoRA adapter but the vLLM server was started with max_lora_rank="
                f"{self.max_rank}: start it with vllm:<folder>?max_lora_rank={rank} (each step of the server's max "
                "rank costs every call on vLLM-CPU, so keep it at the rank you train)"
            )

    async def unload(self, key: str | None) -> bool:
        """Stop serving weight set `key`'s adapter (its calls get the base model again); True when it had one."""
        old = self.served.pop(key, None)
        if old is None:
            return False
        await self._unload(old.name)
        return True

    async def reload(self) -> None:
        """Load every served adapter again (a restarted server has none)."""
        for adapter in list(self.served.values()):
            await self._post("/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": adapter.path})
        if self.served:
            log.info("reloaded %d LoRA adapter(s) into the restarted vLLM", len(self.served))

    async def unload_all(self) -> None:
        """Unload every adapter this registry loaded (an attached server is left as it was found)."""
        for key in list(self.served):
            await self.unload(key)

    async def _unload(self, name: str) -> None:
        try:
            await self._post("/v1/unload_lora_adapter", {"lora_name": name})
        except EngineError as exc:  # calls no longer reach it; a leftover only costs server memory
            log.warning("could not unload superseded adapter %s: %s", name, exc)

    async def _post(self, path: str, body: dict[str, str]) -> None:
        try:
            async with httpx.AsyncClient(
                timeout=_ADMIN_TIMEOUT_S, headers=self.headers, transport=self.transport
            ) as client:
                resp = await client.post(self.root_url + path, json=body)
        except (httpx.HTTPError, OSError) as exc:
            raise EngineUnavailable(f"vLLM unreachable for {path}: {type(exc).__name__}: {exc}") from exc
        if resp.status_code == 404:
            raise EngineError(
                f"the server at {self.root_url} has no {path} route: it cannot load adapters at run time "
                "(start vLLM with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
                upstream_status=404,
            )
        if resp.status_code == 400 and path.endswith("/load_lora_adapter") and "already" in resp.text:
            return  # the same name (same version and folder) is loaded: a restart of kiln, not of vLLM
        if resp.status_code >= 400:
            raise EngineError(
                f"vLLM refused {path} {body}: HTTP {resp.status_code}: {resp.text[:300]}", upstream_status=resp.status_code
            )
