"""Which published weights a server may load: local safetensors folders under allowed roots.

A resources record is written by any client the store trusts, and its `adapter_path` is handed
to the engine, so without a check a publish could make the server read any folder it can see,
reach the hub for a model id, or unpickle a `.bin` (code execution). The check is:

- the path resolves (realpath: `..` and symlinks followed) into one of the allowed roots: the
  trainer's run dir, `kiln serve --weights-root DIR` (repeatable) and $KILN_WEIGHTS_ROOTS
  (os.pathsep-separated); every entry of the folder must resolve there too (no symlinked file
  pointing out of the root);
- it is an existing local folder (so a hub id is refused before anything could fetch it);
- its weights are safetensors, and it holds no pickle-format file (.bin, .pt, .pth, .pkl, ...).

The check runs at publish time (POST /api/v1/resources answers 422) and again at load time (the
folder may have changed since). It does not guard against a folder swapped between the check and
the load by someone who can already write inside a root.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOTS_ENV = "KILN_WEIGHTS_ROOTS"
DEFAULT_MAX_WEIGHT_SETS = 8
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")


class WeightsRefused(ValueError):
    """A published weights path this server will not load; the message says why."""


def roots_from_env(env: Mapping[str, str] = os.environ) -> list[Path]:
    return [Path(p).expanduser() for p in env.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()]


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(str(path))))


def check_format(folder: Path) -> None:
    """Refuse a folder whose weights are not safetensors or which holds any pickle-format file."""
    names = {entry.name for entry in folder.iterdir()}
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise WeightsRefused(f"{folder} holds pickle-format files ({', '.join(pickles)}); only safetensors are loaded")
    if "adapter_config.json" in names:
        if "adapter_model.safetensors" not in names:
            raise WeightsRefused(f"{folder} is a LoRA adapter without adapter_model.safetensors")
    elif "config.json" not in names or not any(n.endswith(".safetensors") for n in names):
        raise WeightsRefused(f"{folder} is neither a LoRA adapter nor a safetensors checkpoint")


@dataclass(frozen=True)
class WeightsPolicy:
    """Allowed roots (resolved at each check, so a run dir created later counts) and the per-agent cap."""

    roots: tuple[Path, ...] = ()
    max_weight_sets: int = DEFAULT_MAX_WEIGHT_SETS

    @classmethod
    def build(
        cls,
        roots: Iterable[str | Path] = (),
        max_weight_sets: int = DEFAULT_MAX_WEIGHT_SETS,
        *,
        env: Mapping[str, str] = os.environ,
        default: str | Path | None = None,
    ) -> WeightsPolicy:
        """`roots` plus $KILN_WEIGHTS_ROOTS; `default` (absolute-ized now) only when both are empty."""
        found = [Path(r).expanduser() for r in roots] + roots_from_env(env)
        if not found and default is not None:
            found = [Path(default).expanduser().absolute()]
        return cls(tuple(found), max_weight_sets)

    def check(self, path: str) -> Path:
        """The real folder to load `path` (relative: to this process's cwd) from, or WeightsRefused."""
        if not path or not path.strip():
            raise WeightsRefused("empty weights path")
        if not self.roots:
            raise WeightsRefused(
                f"weights {path!r} refused: this server has no weights roots (kiln serve --weights-root DIR "
                f"or ${ROOTS_ENV})"
            )
        real = _real(path)
        root = self._root_of(real)
        if root is None:
            allowed = ", ".join(str(r) for r in self.roots)
            raise WeightsRefused(f"weights {path!r} (real path {real}) are outside the allowed roots ({allowed})")
        if not real.is_dir():
            what = "a file" if real.exists() else "not a local folder (hub ids are never fetched)"
            raise WeightsRefused(f"weights {path!r} are {what}; a local adapter or checkpoint folder is needed")
        for entry in real.iterdir():
            if not _real(entry).is_relative_to(root):
                raise WeightsRefused(f"weights {path!r}: {entry.name} links outside the allowed root {root}")
        check_format(real)
        return real

    def _root_of(self, real: Path) -> Path | None:
        for root in self.roots:
            resolved = _real(root)
            if real.is_relative_to(resolved):
                return resolved
        return None

    def refusals(
        self, main: str | None, agents: Mapping[str, str], n_agents: int | None = None
    ) -> dict[str | None, str]:
        """Why each weight set of one version is refused (key None: the main weights); empty: all loadable.

        `main`/`agents` are the paths to check (None: nothing to load for the main weights);
        `n_agents` (default len(agents)) is how many agents the version gives their own weights.
        More than `max_weight_sets` refuses every agent set of the version (which to drop would be
        arbitrary, and a half-loaded team would train the wrong thing).
        """
        out: dict[str | None, str] = {}
        n_agents = len(agents) if n_agents is None else n_agents
        if main is not None:
            try:
                self.check(main)
            except WeightsRefused as exc:
                out[None] = str(exc)
        if n_agents > self.max_weight_sets:
            msg = f"{n_agents} agents name their own weights; this server serves at most {self.max_weight_sets}"
            return {**out, **{agent: msg for agent in agents}}
        for agent, path in agents.items():
            try:
                self.check(path)
            except WeightsRefused as exc:
                out[agent] = str(exc)
        return out


def describe(refused: Mapping[str | None, str]) -> str:
    """One line for logs and the engine status's last_error."""
    return "; ".join(f"{'main weights' if who is None else f'agent {who!r}'}: {why}" for who, why in refused.items())
