"""Resources versions for the dashboard: what each version serves per agent, and how prompts changed.

Prompt diffs are computed here (difflib, unified) between each version and the previous one,
so the page shows what APO or a person changed without the browser diffing anything.
"""

from __future__ import annotations

import difflib
from typing import Any

from agentkiln.models import Resources
from agentkiln.store.base import Store

MAX_VERSIONS = 1_000


def _adapters(res: Resources) -> dict[str, dict[str, Any]]:
    """Agent -> {model, adapter_path} served to it ("*" = every agent without its own weights)."""
    out: dict[str, dict[str, Any]] = {}
    main = res.main_llm()
    if main is not None:
        out["*"] = {"model": main.model, "adapter_path": main.adapter_path}
    for agent, llm in res.agent_llms().items():
        out[agent] = {"model": llm.model, "adapter_path": llm.adapter_path}
    return out


def _diff(old: str, new: str, name: str, old_v: int, new_v: int) -> str:
    return "\n".join(
        difflib.unified_diff(
            old.splitlines(), new.splitlines(), f"{name} (v{old_v})", f"{name} (v{new_v})", lineterm=""
        )
    )


async def resources_versions(store: Store) -> list[dict[str, Any]]:
    """Newest first, each with its adapters per agent and the prompt diffs against the version before."""
    versions = await store.query_resources(limit=MAX_VERSIONS)
    out = []
    prev: Resources | None = None
    for res in versions:
        diffs = {}
        if prev is not None:
            for name in sorted(set(prev.prompts) | set(res.prompts)):
                old = prev.prompts[name].template if name in prev.prompts else ""
                new = res.prompts[name].template if name in res.prompts else ""
                if old != new:
                    diffs[name] = _diff(old, new, name, prev.version, res.version)
        out.append(
            {
                "resources_id": res.resources_id,
                "version": res.version,
                "created_at": res.created_at,
                "metadata": res.metadata,
                "adapters": _adapters(res),
                "prompts": {k: p.template for k, p in res.prompts.items()},
                "prompt_diffs": diffs,
            }
        )
        prev = res
    return out[::-1]
