"""The `kiln` typer application; command modules register themselves on it."""

import typer

app = typer.Typer(
    name="kiln",
    help="AgentKiln: make AI agents better from their own runs (run -> learn -> improve).",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """AgentKiln command line (a callback keeps `kiln <command>` a group even with one command)."""
