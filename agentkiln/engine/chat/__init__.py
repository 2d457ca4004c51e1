"""Chat templates per model: prompt rendering and tool-call parsing (see template.ChatTemplate)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from agentkiln.engine.chat.hf_template import HFChatTemplate
from agentkiln.engine.chat.smollm2 import ChatMLTemplate, SmolLM2Template, is_smollm2
from agentkiln.engine.chat.template import ChatTemplate, RenderedPrompt

log = logging.getLogger(__name__)

__all__ = ["ChatTemplate", "RenderedPrompt", "template_for"]


def template_for(tokenizer: Any, model_dir: str | Path | None = None) -> ChatTemplate:
    """SmolLM2's format for SmolLM2 models, else the model's own template (plain ChatML if it has none)."""
    names = [str(getattr(tokenizer, "name_or_path", "") or "")]
    if model_dir is not None:
        path = Path(model_dir)
        names.append(path.name)
        try:
            config = json.loads((path / "config.json").read_text())
            names.append(str(config.get("_name_or_path", "")))
        except (OSError, ValueError):
            pass
    if is_smollm2(tokenizer, names):
        return SmolLM2Template(tokenizer)
    if getattr(tokenizer, "chat_template", None):
        return HFChatTemplate(tokenizer)
    log.warning("tokenizer of %s has no chat template; using plain ChatML", model_dir or names[0])
    return ChatMLTemplate(tokenizer)
