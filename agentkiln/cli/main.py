"""Entry point of the `kiln` command."""

import logging
import os

from agentkiln.cli.app import app

# Each module adds its commands to `app` when imported.
COMMAND_MODULES: list[str] = [
    "agentkiln.cli.run",
    "agentkiln.cli.dev",
    "agentkiln.cli.demo",
    "agentkiln.cli.serve",
    "agentkiln.cli.train",
    "agentkiln.cli.canary",
]


def main() -> None:
    import importlib

    logging.basicConfig(
        level=os.environ.get("KILN_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # Per-request client logs drown out progress; keep them for debugging only.
    for noisy in ("httpx", "httpx2", "httpcore", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for module in COMMAND_MODULES:
        importlib.import_module(module)
    app()


if __name__ == "__main__":
    main()
