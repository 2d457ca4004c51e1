"""Export transitions for offline use: JSONL (one transition per line) and `datasets.Dataset`.

Both keep the wire field names (`return`, not `return_`), so a file written here reloads
as `Transition`s and other trainers (TRL, verl) can read the columns directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from agentkiln.models import Transition

if TYPE_CHECKING:  # datasets is heavy to import; only load it when exporting to it
    import datasets

log = logging.getLogger(__name__)


def transition_record(t: Transition) -> dict:
    return t.model_dump(mode="json", by_alias=True)


def write_jsonl(transitions: Iterable[Transition], path: str | Path) -> int:
    """Write one JSON object per line (atomically via a temp file); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for t in transitions:
            f.write(json.dumps(transition_record(t), ensure_ascii=False))
            f.write("\n")
            n += 1
    tmp.replace(path)
    log.info("wrote %d transitions to %s", n, path)
    return n


def read_jsonl(path: str | Path) -> list[Transition]:
    out: list[Transition] = []
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                out.append(Transition.model_validate_json(line))
    return out


def to_dataset(transitions: Iterable[Transition]) -> datasets.Dataset:
    """A Hugging Face Dataset with one row per transition (columns = wire field names)."""
    import datasets

    records = [transition_record(t) for t in transitions]
    if not records:
        names = [f.alias or n for n, f in Transition.model_fields.items()]
        return datasets.Dataset.from_dict({n: [] for n in names})
    return datasets.Dataset.from_list(records)


def from_dataset(ds: datasets.Dataset) -> list[Transition]:
    return [Transition.model_validate(row) for row in ds]
