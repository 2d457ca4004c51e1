"""`kiln canary start|status|promote|rollback`: try a candidate version on a share of sessions.

Every command talks to a running server (`--server`, `--api-key`: the admin key); the rule's
options default to `models.CanaryRule`'s defaults, and the body is validated by `CanaryIn` here
first, so a bad option is named before anything is sent. ID defaults to the active canary.
"""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from agentkiln.cli.app import app
from agentkiln.cli.run import DEFAULT_SERVER
from agentkiln.models import CanaryRule
from agentkiln.protocol import CANARIES_PATH, auth_headers

canary_app = typer.Typer(name="canary", help="Canary a candidate version: start, status, promote, rollback.",
                         no_args_is_help=True)  # fmt: skip
app.add_typer(canary_app, name="canary")

_RULE = CanaryRule.model_fields
SERVER = typer.Option(DEFAULT_SERVER, "--server", envvar="KILN_SERVER_URL", help="kiln server URL.")
API_KEY = typer.Option(None, "--api-key", envvar="KILN_API_KEY", help="The server's admin key (prefer the env var).")
CANARY_ID = typer.Argument(None, help="canary id (default: the active canary)")
REASON = typer.Option("", "--reason", help="why: recorded with the decision")


class _Client:
    """The few calls the commands make; any error answer exits 1 with the server's message."""

    def __init__(self, server: str, api_key: str | None) -> None:
        import httpx

        self._http = httpx.Client(base_url=server.rstrip("/"), headers=auth_headers(api_key), timeout=30.0)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, CANARIES_PATH + path, json=body)
        except httpx.HTTPError as exc:
            raise _fail(f"cannot reach the server: {exc}") from None
        if resp.status_code >= 400:
            raise _fail(f"{resp.status_code}: {_message(resp)}")
        return resp.json()

    def canary_id(self, given: str | None) -> str:
        if given:
            return given
        active = self.active()
        if active is None:
            raise _fail("no active canary: name one (kiln canary status ID) or start one")
        return str(active["canary_id"])

    def active(self) -> dict[str, Any] | None:
        """The active canary; None when the server answers null or 404 (none active)."""
        import httpx

        try:
            resp = self._http.get(CANARIES_PATH + "/active")
        except httpx.HTTPError as exc:
            raise _fail(f"cannot reach the server: {exc}") from None
        if resp.status_code == 404:
            return None
        if resp.status_code >= 400:
            raise _fail(f"{resp.status_code}: {_message(resp)}")
        return resp.json() or None


def _message(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return resp.text[:500]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2))


@canary_app.command("start")
def start(
    candidate: str = typer.Option(..., "--candidate", help="resources id of the candidate version"),
    baseline: str | None = typer.Option(None, "--baseline", help="resources id compared with (default: the deployed one)"),
    share: float = typer.Option(0.2, "--share", help="share of sessions the candidate serves, in (0, 1)"),
    metric: str = typer.Option(_RULE["metric"].default, "--metric", help="feedback name compared"),
    min_samples: int = typer.Option(_RULE["min_samples"].default, "--min-samples", help="rated sessions per version before a verdict"),
    max_samples: int = typer.Option(_RULE["max_samples"].default, "--max-samples", help="rated sessions per version without a verdict: roll back"),
    confidence: float = typer.Option(_RULE["confidence"].default, "--confidence", help="of the difference's interval"),
    max_regression: float = typer.Option(_RULE["max_regression"].default, "--max-regression", help="how much worse still promotes"),
    manual: bool = typer.Option(False, "--manual", help="never decide by the rule, only by promote/rollback"),
    as_json: bool = typer.Option(False, "--json", help="print the canary record"),
    server: str = SERVER,
    api_key: str | None = API_KEY,
) -> None:  # fmt: skip
    """Start a canary: the candidate serves `--share` of sessions until promoted or rolled back."""
    import pydantic

    from agentkiln.models import CanaryIn

    rule = {"metric": metric, "min_samples": min_samples, "max_samples": max_samples, "confidence": confidence,
            "max_regression": max_regression, "auto": not manual}  # fmt: skip
    try:
        body = CanaryIn.model_validate(
            {"candidate_resources_id": candidate, "baseline_resources_id": baseline, "share": share, "rule": rule}
        )
    except pydantic.ValidationError as exc:
        raise typer.BadParameter(_validation_message(exc)) from None
    made = _Client(server, api_key).call("POST", "", body.model_dump(mode="json"))
    if as_json:
        _echo_json(made)
        return
    typer.echo(
        f"canary {made['canary_id']} started: candidate {made['candidate_resources_id']} serves "
        f"{made['share']:.0%} of sessions, baseline {made['baseline_resources_id']}"
        + (" (decided by hand only)" if manual else "")
    )


def _validation_message(exc: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())


@canary_app.command("status")
def status(
    canary_id: str | None = CANARY_ID,
    as_json: bool = typer.Option(False, "--json", help="print {canary, stats} as JSON"),
    server: str = SERVER,
    api_key: str | None = API_KEY,
) -> None:
    """A canary's state, the evidence per version and its decisions."""
    client = _Client(server, api_key)
    cid = client.canary_id(canary_id)
    canary = client.call("GET", f"/{cid}")
    stats = client.call("GET", f"/{cid}/stats")
    if as_json:
        _echo_json({"canary": canary, "stats": stats})
        return
    _print_status(canary, stats)


def _num(value: Any, fmt: str = "{:.4f}") -> str:
    return "-" if value is None else fmt.format(value)


def _print_status(canary: dict[str, Any], stats: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rule = canary["rule"]
    console.print(
        f"canary [bold]{canary['canary_id']}[/bold]: {canary['status']}, candidate on {canary['share']:.0%} of sessions; "
        f"rule: {rule['metric']}, {rule['min_samples']}-{rule['max_samples']} sessions, "
        f"{rule['confidence']:.0%} interval, max regression {rule['max_regression']}"
        + ("" if rule["auto"] else ", by hand only")
    )
    arms = Table(title=f"feedback '{stats['metric']}' per version")
    for column in ("version", "resources", "rated sessions", "ratings", "mean"):
        arms.add_column(column)
    for name in ("baseline", "candidate"):
        arm = stats[name]
        version = f"v{arm['version']}" if arm["version"] is not None else "?"
        arms.add_row(f"{name} {version}", arm["resources_id"], str(arm["n"]), str(arm["ratings"]), _num(arm["mean"]))
    console.print(arms)
    console.print(
        f"difference {_num(stats['difference'], '{:+.4f}')}, {stats['confidence']:.0%} interval "
        f"[{_num(stats['lower'], '{:+.4f}')}, {_num(stats['upper'], '{:+.4f}')}]"
    )
    promoted = canary.get("promoted_resources_id") or stats.get("promoted_resources_id")
    if promoted:
        console.print(f"promoted: deployed as {promoted}")
    decisions = Table(title="decisions")
    for column in ("at", "action", "by", "reason"):
        decisions.add_column(column)
    for d in canary["decisions"]:
        decisions.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["at"])), d["action"], d["by"], d["reason"]
        )
    console.print(decisions)


def _decide(action: str, canary_id: str | None, reason: str, as_json: bool, server: str, api_key: str | None) -> None:
    client = _Client(server, api_key)
    cid = client.canary_id(canary_id)
    decided = client.call("POST", f"/{cid}/{action}", {"reason": reason})
    if as_json:
        _echo_json(decided)
    elif action == "promote":
        typer.echo(f"canary {cid} promoted: deployed as {decided.get('promoted_resources_id')}")
    else:
        typer.echo(f"canary {cid} rolled back: the baseline {decided['baseline_resources_id']} serves every session")


@canary_app.command("promote")
def promote(
    canary_id: str | None = CANARY_ID,
    reason: str = REASON,
    as_json: bool = typer.Option(False, "--json", help="print the decided canary"),
    server: str = SERVER,
    api_key: str | None = API_KEY,
) -> None:
    """Deploy the candidate now (publishes it as the deployed version) and end the canary."""
    _decide("promote", canary_id, reason, as_json, server, api_key)


@canary_app.command("rollback")
def rollback(
    canary_id: str | None = CANARY_ID,
    reason: str = REASON,
    as_json: bool = typer.Option(False, "--json", help="print the decided canary"),
    server: str = SERVER,
    api_key: str | None = API_KEY,
) -> None:
    """Stop serving the candidate and end the canary; the baseline keeps serving."""
    _decide("rollback", canary_id, reason, as_json, server, api_key)
