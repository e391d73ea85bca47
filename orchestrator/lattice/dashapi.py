"""The dashboard over a lattice: the control API's methods as the dashboard uses them
(tui.link.Api), answered from NATS, so that `orch dash --lattice URL` shows a whole lattice
as `orch dash` shows one orchestrator.

- `status()`: the lattice's status (orchestrator.lattice.status: where each capsule serves,
  what it wants) in the shape of `GET /v1/status`. Each capsule row adds `hosts` (where it
  serves), `on` (each host's phase, version and last error), `wanted`, `placed_on` and
  `problem`; its counters (calls, errors, fuel, KV conflicts, lost events) add up the
  hosts' reports, which a host republishes on every phase change and at least every
  STATUS_REFRESH_SECONDS (so they may be that old). The `orchestrator` section carries
  `lattice` (name, servers, revision, hosts, scheduler, problems): what tells the
  dashboard to show a host column. Every value is checked here: a malformed report in the
  status bucket gives a row with less in it, never a dashboard that fails.
- `capsule(name)`: the deployment as the desired revision has it (manifest, limits,
  config with secrets masked) and its row; `history` is empty (hosts keep no history here).
- `call`: a lattice call (orchestrator.lattice.calls), waiting as long as the capsule's
  `timeout_ms` allows; `kv_list`/`kv_get`: the lattice's KV; `events`: the lattice's bus.
- `restart`, `reconcile`, `plan`, `approve`, `reject`: refused (409 `NotOnLattice`): hosts
  converge on the applied revision by themselves; `orch apply` changes it.

Errors: what a request returns is a `LatticeCallError` (status, kind, message, as the
control API would answer), which the dashboard shows as it shows the API's errors. A
lattice that cannot be reached, or that stops answering, is a `LatticeError` naming it:
the dashboard then says it is disconnected, closes this client and opens a new one until
one connects (`connect_lattice` makes them).

Events are renumbered: the hosts number their events each on its own, while the dashboard
takes a number it has seen before as history it has shown already. `EventNumbers`, shared
by the clients of one dashboard, gives each event (by host, sequence and time) one number
of its own, rising, and the same number when a reopened stream replays it; the host's own
number stays in `host_seq`, and `source` names the host (`counter@host-a`).

Used by the CLI (`orch dash --lattice`), which hands `connect_lattice(address)` to
tui.run_dashboard. No Textual here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import nats.errors

from ..desired.manifest import SECRET_MASK
from ..desired.spec import CapsuleSpec
from ..errors import OrchestratorError
from .calls import DEFAULT_TIMEOUT_S, LatticeCallError, call_timeout, call_tool
from .callwire import status_of as http_status_of
from .connection import CONNECT_SECONDS, Lattice, LatticeAddress, LatticeError
from .desiredstate import deployment_names, latest_good
from .history import HISTORY_EVENTS
from .history import events as lattice_events
from .status import read_reports, status_of

logger = logging.getLogger(__name__)

CLOSE_SECONDS = 5.0
REMEMBER_EVENTS = 20_000  # events whose numbers are kept (a reopened stream replays at most 1,000)
MAX_PROBLEMS = 200
COUNTERS = ("calls", "errors", "conflicts", "events_lost")
NOT_ON_LATTICE = (
    "not available on a lattice: its hosts converge on the applied revision by themselves; "
    "change it with `orch apply CONFIG --lattice URL`"
)


# -- the status, checked ---------------------------------------------------------------------------
def _int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _strings(value: Any) -> list[str]:
    return [item for item in _list(value) if isinstance(item, str)]


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, Mapping) else {}


def _line(value: Any, limit: int = 2000) -> str:
    return " ".join(str(value).split())[:limit]


def dash_status(doc: Any, reports: Any, *, lattice: str, servers: str) -> dict[str, Any]:
    """The lattice status `doc` (status.summarize) and the hosts' `reports` (by host id) as
    the dashboard reads `GET /v1/status`. Pure; any part may be missing or malformed."""
    doc = doc if isinstance(doc, Mapping) else {}
    rows: dict[tuple[str, str], Mapping[str, Any]] = {}  # (host, capsule) -> that host's row
    for host, report in reports.items() if isinstance(reports, Mapping) else ():
        for row in _list(report.get("capsules") if isinstance(report, Mapping) else None):
            if isinstance(host, str) and isinstance(row, Mapping) and isinstance(row.get("name"), str):
                rows.setdefault((host, row["name"]), row)
    capsules: dict[str, dict[str, Any]] = {}
    for entry in _list(doc.get("capsules")):
        if isinstance(entry, Mapping) and _text(entry.get("name")) and entry["name"] not in capsules:
            capsules[entry["name"]] = capsule_row(entry, rows)
    hosts = [
        {
            "id": host["id"],
            "alive": host.get("alive") is True,
            "draining": host.get("draining") is True,
            "labels": _labels(host.get("labels")),
            "capsules": _int(host.get("capsules")),
        }
        for host in _list(doc.get("hosts"))
        if isinstance(host, Mapping) and _text(host.get("id"))
    ]
    desired = doc.get("desired") if isinstance(doc.get("desired"), Mapping) else {}
    applied_at = _opt_int(desired.get("applied_at_ms"))
    info: dict[str, Any] = {
        "config_path": _text(desired.get("source")) or servers,  # where it was applied from, else where it is
        "config_sha256": _text(desired.get("config_sha256")),
        "lattice": {
            "name": lattice,
            "servers": servers,
            "revision": _int(desired.get("revision")),
            "applied_at_ms": applied_at,
            "applied_by": _text(desired.get("applied_by")),
            "scheduler": _text(doc.get("scheduler")),
            "hosts": hosts,
            "problems": [_line(p) for p in _list(doc.get("problems"))[:MAX_PROBLEMS]],
        },
    }
    if applied_at:  # what the top bar says of a config: when this revision was applied
        info["desired"] = {"state": "accepted", "accepted_at_ms": applied_at, "broken": {}, "builds_failed": {}}
    return {"orchestrator": info, "capsules": [capsules[name] for name in sorted(capsules)]}


def capsule_row(entry: Mapping[str, Any], rows: Mapping[tuple[str, str], Mapping[str, Any]]) -> dict[str, Any]:
    """One capsule of the lattice status as a row of `GET /v1/status`, its counters added up
    over the hosts that report it (`rows`: (host, capsule) -> that host's row)."""
    name = str(entry["name"])
    phase = entry.get("phase")
    on = [
        {
            "host": item["host"],
            "phase": item.get("phase") if isinstance(item.get("phase"), str) else "Unknown",
            "version": _text(item.get("version")),
            "last_error": _line(item["last_error"]) if _text(item.get("last_error")) else None,
        }
        for item in _list(entry.get("on"))
        if isinstance(item, Mapping) and _text(item.get("host"))
    ]
    hosts = _strings(entry.get("hosts"))
    mine = [(item["host"], rows[(item["host"], name)]) for item in on if (item["host"], name) in rows]
    serving = [row for host, row in mine if host in hosts]
    totals = {key: sum(_int(row.get(key)) for _, row in mine) for key in COUNTERS}
    fuel = sum(_int(row.get("fuel_mean")) * _int(row.get("calls")) for _, row in mine)
    retries = [t for _, row in mine if (t := _opt_int(row.get("next_retry_ms")))]
    since = [t for _, row in mine if (t := _opt_int(row.get("since_ms")))]
    row: dict[str, Any] = {
        "name": name,
        "phase": phase if isinstance(phase, str) and phase else "Unknown",
        "version": _text(entry.get("version")) or next((o["version"] for o in on if o["version"]), None),
        "hosts": hosts,
        "on": on,
        "wanted": _int(entry.get("wanted")),
        "placed_on": _strings(entry.get("placed_on")),
        "enabled": entry.get("enabled") is True,
        "problem": _line(entry["problem"]) if _text(entry.get("problem")) else None,
        "instances": sum(_int(r.get("instances")) for r in serving),
        **totals,
        "fuel_mean": round(fuel / totals["calls"]) if totals["calls"] else 0,
        "fuel_last": max((_int(r.get("fuel_last")) for _, r in mine), default=0),
        "reload_count": max((_int(r.get("reload_count")) for _, r in mine), default=0),
        "since_ms": max(since, default=None),
        "next_retry_ms": min(retries, default=None),
        "last_error": None,
        "last_error_tool": None,
        "last_error_at_ms": None,
    }
    failed = [(host, r) for host, r in mine if _text(r.get("last_error"))]
    if failed:  # the newest error of any host, which names it
        host, latest = max(failed, key=lambda pair: _int(pair[1].get("last_error_at_ms")))
        row["last_error"] = f"{host}: {_line(latest['last_error'])}"
        row["last_error_tool"] = _text(latest.get("last_error_tool"))
        row["last_error_at_ms"] = _opt_int(latest.get("last_error_at_ms"))
    elif errors := [o for o in on if o["last_error"]]:
        row["last_error"] = f"{errors[0]['host']}: {errors[0]['last_error']}"
    elif row["problem"]:
        row["last_error"] = row["problem"]  # not placed: why
    return row


def capsule_detail(name: str, spec: CapsuleSpec | None, row: Mapping[str, Any] | None) -> dict[str, Any]:
    """`GET /v1/capsules/{name}` of a lattice deployment: `spec` as the desired revision
    has it (None: a host runs it, the revision does not), `row` its status row."""
    status = dict(row) if row is not None else None
    detail: dict[str, Any] = {
        "status": status,
        "history": [],
        "hosts": list((status or {}).get("hosts", [])),
        "on": list((status or {}).get("on", [])),
        "placed_on": list((status or {}).get("placed_on", [])),
    }
    if spec is None:
        missing = "(not in the desired state)"
        return {**detail, "package": {"name": name}, "tools": [], "folder": missing}
    manifest = spec.manifest
    env = {k: v for k, v in manifest.get("env", {}).items() if isinstance(v, Mapping)}
    return {
        **detail,
        "package": manifest.get("package", {}),
        "tools": manifest.get("tool", []),
        "interceptors": manifest.get("interceptor", []),
        "capabilities": manifest.get("capabilities", {}),
        "env": {k: {kk: vv for kk, vv in v.items() if kk != "default"} for k, v in env.items()},
        "limits": dict(spec.limits),
        "instances": spec.instances,
        "depends_on": list(spec.depends_on),
        "enabled": spec.enabled,
        "config": {k: SECRET_MASK if k in spec.secret_keys else v for k, v in spec.config.items()},
        "wasm_sha256": spec.wasm_sha256,
        "folder": spec.folder,
        "wanted": spec.hosts,
        "labels": dict(spec.labels),
    }


# -- events ----------------------------------------------------------------------------------------
class EventNumbers:
    """One number per event, rising, across the streams one dashboard opens (see the module
    docstring); the numbers of the last `remember` events are kept for replays."""

    def __init__(self, remember: int = REMEMBER_EVENTS) -> None:
        self._last = 0
        self._remember = remember
        self._seen: OrderedDict[tuple[str, Any, Any], int] = OrderedDict()

    def number(self, item: dict[str, Any]) -> dict[str, Any]:
        if "topic" not in item:  # the end of the history, a loss notice
            return item
        host, seq = str(item.get("host", "")), item.get("seq")
        key = (host, seq, item.get("timestamp_ms"))
        number = self._seen.get(key)
        if number is None:
            self._last += 1
            number = self._seen[key] = self._last
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
        source = str(item.get("source", ""))
        return {**item, "seq": number, "host_seq": seq, "source": f"{source}@{host}" if host else source}


# -- the client ------------------------------------------------------------------------------------
class LatticeDashApi:
    """The dashboard's API over one lattice connection: `async with` it."""

    def __init__(
        self, address: LatticeAddress, *, numbers: EventNumbers | None = None, timeout: float = CONNECT_SECONDS
    ) -> None:
        self.address = address
        self._numbers = numbers or EventNumbers()
        self._timeout = timeout
        self._lattice: Lattice | None = None
        self._kv: Any = None
        self._last: dict[str, Any] | None = None  # the last status answered
        self._timeouts: dict[str, float] = {}  # how long a call of each deployment is waited for

    @property
    def where(self) -> str:
        return f"lattice {self.address.name} at {self.address.shown}"

    async def __aenter__(self) -> LatticeDashApi:
        self._lattice = await Lattice.connect(self.address, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        lattice, kv, self._lattice, self._kv = self._lattice, self._kv, None, None
        if lattice is None:
            return
        try:
            async with asyncio.timeout(CLOSE_SECONDS):
                if kv is not None:
                    await kv.close()
                if lattice.nc.is_connected:
                    await lattice.close()
        except (nats.errors.Error, OrchestratorError, OSError, TimeoutError) as error:
            logger.debug("%s: closing: %r", self.where, error)
        with contextlib.suppress(nats.errors.Error, OSError):
            await lattice.nc.close()  # stops reconnecting to a server that went away

    def _connected(self) -> Lattice:
        lattice = self._lattice
        if lattice is None or not lattice.nc.is_connected:
            raise LatticeError(f"{self.where}: the connection is lost (reconnecting)")
        return lattice

    def _away(self, error: BaseException) -> LatticeError:
        """The lattice stopped answering: the dashboard shows it as disconnected."""
        if self._lattice is None or not self._lattice.nc.is_connected:
            return LatticeError(f"{self.where}: the connection is lost (reconnecting)")
        return LatticeError(f"{self.where} does not answer ({type(error).__name__}: {_line(error, 200)})")

    # -- status ----------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        lattice = self._connected()
        try:
            doc = await status_of(lattice)
            reports = await read_reports(lattice)
        except asyncio.CancelledError:
            raise
        except LatticeError:
            raise
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise self._away(error) from None
        except Exception as error:  # a value below that no check foresaw: say so, keep going
            logger.warning("%s: the status cannot be read", self.where, exc_info=error)
            raise LatticeError(
                f"{self.where}: its status cannot be read ({type(error).__name__}: {_line(error, 200)}); "
                "`orch status --lattice` says more"
            ) from None
        self._last = dash_status(doc, reports, lattice=self.address.name, servers=self.address.shown)
        return self._last

    async def capsule(self, name: str) -> dict[str, Any]:
        lattice = self._connected()
        try:
            desired, _ = await latest_good(lattice)
            status = self._last if self._last is not None else await self.status()
        except OrchestratorError as error:
            raise _answer(error) from None
        except (nats.errors.Error, OSError, TimeoutError) as error:
            raise self._away(error) from None
        deployment = desired.deployments.get(name) if desired is not None else None
        row = next((c for c in status.get("capsules", []) if c.get("name") == name), None)
        if deployment is None and row is None:
            known = ", ".join(sorted(desired.deployments)) if desired is not None else ""
            raise LatticeCallError(
                404, "UnknownCapsule", f"no capsule {name!r} in {self.where} (deployed: {known or 'none'})"
            )
        spec = deployment.spec if deployment is not None else None
        if spec is not None:
            self._timeouts[name] = call_timeout(_int(spec.limits.get("timeout_ms"), 5000))
        return capsule_detail(name, spec, row)

    # -- calls and KV ----------------------------------------------------------------------------
    async def call(self, name: str, tool: str, arguments: bytes) -> tuple[bytes, dict[str, str]]:
        lattice = self._connected()
        timeout = self._timeouts.get(name, DEFAULT_TIMEOUT_S)
        return await call_tool(
            lattice, name, tool, arguments, timeout=timeout, deployed=lambda: deployment_names(lattice)
        )

    async def _store(self) -> Any:
        if self._kv is None:
            from .kvstore import JetStreamKV

            self._kv = await JetStreamKV.open(self._connected())
        return self._kv

    async def kv_list(self, name: str, prefix: str = "") -> dict[str, Any]:
        try:
            keys = await (await self._store()).list_keys(name, prefix)
        except OrchestratorError as error:
            raise _answer(error) from None
        return {"capsule": name, "prefix": prefix, "keys": keys}

    async def kv_get(self, name: str, key: str) -> bytes:
        try:
            value = await (await self._store()).get(name, key)
        except OrchestratorError as error:
            raise _answer(error) from None
        if value is None:
            raise LatticeCallError(404, "NoSuchKey", f"capsule {name!r} has no key {key!r}")
        return bytes(value)

    async def events(self, topic: str = ">", history: int = 0) -> AsyncIterator[dict[str, Any]]:
        stream = lattice_events(self._connected(), topic, max(0, min(history, HISTORY_EVENTS)))
        try:
            async for item in stream:
                yield self._numbers.number(item)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    # -- what a lattice does not do from here ------------------------------------------------------
    async def restart(self, name: str) -> Any:
        raise LatticeCallError(409, "NotOnLattice", f"restart: {NOT_ON_LATTICE}")

    async def reconcile(self) -> Any:
        raise LatticeCallError(409, "NotOnLattice", f"reconcile: {NOT_ON_LATTICE}")

    async def plan(self) -> Any:
        raise LatticeCallError(409, "NotOnLattice", f"plan: {NOT_ON_LATTICE} (`orch plan CONFIG --lattice URL`)")

    async def approve(self, name: str, spec_hash: str | None = None) -> Any:
        raise LatticeCallError(409, "NotOnLattice", f"approve: {NOT_ON_LATTICE}")

    async def reject(self, name: str, spec_hash: str | None = None) -> Any:
        raise LatticeCallError(409, "NotOnLattice", f"reject: {NOT_ON_LATTICE}")


def _answer(error: OrchestratorError) -> OrchestratorError:
    """A request's error as the control API would answer it (a LatticeError stays one: the
    lattice went away)."""
    if isinstance(error, LatticeCallError | LatticeError):
        return error
    return LatticeCallError(http_status_of(error), type(error).__name__, str(error))


def connect_lattice(address: LatticeAddress, *, timeout: float = CONNECT_SECONDS) -> Callable[[], LatticeDashApi]:
    """What tui.run_dashboard takes as `connect`: a new client of the lattice at `address`
    each time the dashboard (re)connects, all numbering events alike."""
    numbers = EventNumbers()
    return lambda: LatticeDashApi(address, numbers=numbers, timeout=timeout)


__all__ = ["EventNumbers", "LatticeDashApi", "capsule_detail", "capsule_row", "connect_lattice", "dash_status"]
