"""One capsule in full: its manifest summary, capabilities, limits, configuration (secrets
arrive masked from the API and stay so), last error, reload history; and its tools: pick
one, read its description and input schema, type JSON arguments (checked against the
schema as you type, problems shown inline), run it, see the output or the error and the
fuel the call used.

The arguments field has the focus when the screen opens (the first tool chosen), so what
is typed goes into it and no shortcut fires; escape leaves it (then `e`, `k`, `R` work),
enter in the tool list comes back to it. Checking runs on a worker thread, one check at a
time and always for the newest text; `enter` waits for the check of what is in the field
and sends only arguments that pass it.

The overview refreshes itself whenever the capsule's status changes (a reload shows up in
its history as it happens). While the capsule awaits approval, the overview says what its
change would grant, and `a` / `x` (out of the arguments field) approve or reject it
(tui.approvals).
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.json import JSON
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Input, OptionList, Static
from textual.widgets.option_list import Option

from .approvals import AnswerDialog, awaiting_of, awaiting_text, rejected_text
from .arguments import ArgumentsField, check_arguments
from .format import Clock, compact, counters, error_origin, hexdump, hosts_detail, is_text, phase_text
from .link import remote_error
from .shell import dash
from .widgets import COMMON_KEYS, DashScreen, TopBar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checked:
    """The outcome of checking `text` against `tool`'s schema."""

    text: str
    tool: dict[str, Any] | None
    value: Any
    problems: tuple[str, ...]


def overview(detail: dict[str, Any], clock: Clock) -> RenderableType:
    """The left pane: what the capsule is, what it may touch, how it is doing."""
    status = detail.get("status") or {}
    package = detail.get("package", {})
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    phase = phase_text(status.get("phase", "?"))
    phase.append(f"  since {clock.ago(status.get('since_ms'))}", style="dim")
    grid.add_row("phase", phase)
    awaiting = awaiting_of(status)
    if awaiting is not None:
        grid.add_row(Text("awaiting", style="bold yellow"), awaiting_text(awaiting, clock))
    elif isinstance(status.get("rejected"), dict):
        grid.add_row(Text("rejected", style="bold red"), rejected_text(status["rejected"], clock))
    grid.add_row("about", package.get("description") or "-")
    grid.add_row("package", f"{package.get('name', '?')} {package.get('version', '')}")
    grid.add_row("version", f"{status.get('version') or '-'}  ({status.get('reload_count', 0)} reloads)")
    grid.add_row("folder", str(detail.get("folder", "")))
    grid.add_row("wasm", f"sha256:{str(detail.get('wasm_sha256', ''))[:16]}…")
    grid.add_row("instances", f"{detail.get('instances', 1)}  ·  enabled: {'yes' if detail.get('enabled') else 'no'}")
    if "on" in detail:  # on a lattice: where it runs
        grid.add_row("hosts", hosts_detail(detail, clock))
    grid.add_row("depends on", ", ".join(detail.get("depends_on", [])) or "-")
    more = counters(status)
    grid.add_row(
        "calls",
        f"{status.get('calls', 0)} ({status.get('errors', 0)} errors)  ·  fuel/call "
        f"{compact(status.get('fuel_mean', 0))}, last {compact(status.get('fuel_last', 0))}"
        + (f"  ·  {more}" if more else ""),
    )
    limits = detail.get("limits", {})
    grid.add_row(
        "limits",
        f"fuel {compact(limits.get('fuel', 0))}  ·  memory {limits.get('memory_mib', '?')} MiB"
        f"  ·  timeout {limits.get('timeout_ms', '?')} ms",
    )
    caps = detail.get("capabilities", {})
    grid.add_row("capabilities", capabilities(caps))
    config = detail.get("config", {})
    env = detail.get("env", {})
    lines = Text()
    for key in sorted(set(config) | set(env)):
        if lines:
            lines.append("\n")
        lines.append(f"{key} = ")
        lines.append(str(config.get(key, "(unset)")), style="bold")
        kind = env.get(key, {}).get("type")
        if kind:
            lines.append(f"  ({kind})", style="dim")
    grid.add_row("config", lines or Text("-"))
    interceptors = detail.get("interceptors", [])
    if interceptors:
        grid.add_row(
            "intercepts",
            "\n".join(f"{i.get('event')} → {i.get('action')} (priority {i.get('priority')})" for i in interceptors),
        )
    error = status.get("last_error")
    origin = error_origin(status, clock)
    if error:
        shown = Text(f"({origin}) ", style="bold red") if origin else Text()
        shown.append(str(error), style="red")
    else:
        shown = Text("none", style="dim")
    grid.add_row("last error", shown)
    if status.get("next_retry_ms"):
        grid.add_row("next retry", Text(clock.until(status["next_retry_ms"]), style="yellow"))
    history = Text()
    for entry in reversed(detail.get("history", [])[-12:]):
        if history:
            history.append("\n")
        history.append(clock.hms(int(entry.get("at_ms", 0)))[:8], style="dim")
        history.append(f"  {entry.get('event')}")
        if entry.get("version"):
            history.append(f"  {str(entry['version'])[:12]}", style="dim")
    grid.add_row("history", history or Text("-"))
    return grid


def capabilities(caps: dict[str, Any]) -> Text:
    text = Text()
    labels = (
        ("fs_read", "read"),
        ("fs_write", "write"),
        ("ipc_publish", "publish"),
        ("ipc_subscribe", "subscribe"),
        ("net", "net"),
    )
    text.append(f"kv {'yes' if caps.get('kv') else 'no'}")
    for key, label in labels:
        items = caps.get(key) or []
        if items:
            text.append(f"\n{label} ")
            text.append(", ".join(map(str, items)), style="bold")
    return text


class CapsuleScreen(DashScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        *COMMON_KEYS,
        Binding("escape", "back", "Back"),
        Binding("enter", "run", "Run tool"),
        Binding("k", "kv", "KV"),
        Binding("R", "restart", "Restart"),
        Binding("e", "app.events", "Events"),
        Binding("a", "approve", "Approve"),  # only while the capsule awaits approval
        Binding("x", "reject", "Reject"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.capsule = name
        self.detail: dict[str, Any] | None = None
        self.tool: dict[str, Any] | None = None
        self.checked: Checked | None = None  # the newest finished check
        self._last_status: Any = None
        self._wanted: tuple[str, dict[str, Any] | None] = ("", None)  # what should be checked
        self.checking = False
        self._run_when_checked = False
        self.answerable = False  # it awaits approval: `a` and `x` work

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Static(Text(f"capsule {self.capsule}", style="bold"), id="title")
        with Horizontal(id="detail-body"):
            with VerticalScroll(id="overview"):
                yield Static("loading…", id="overview-text")
            with Vertical(id="tools"):
                yield OptionList(id="tool-list")
                with VerticalScroll(id="tool-pane"):
                    yield Static(id="tool-doc")
                    yield ArgumentsField(id="args")
                    yield Static(id="args-problem")
                    yield Static(id="tool-output")
                    yield Static(id="tool-schema")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#args", ArgumentsField).focus()  # typing goes here, not to the shortcuts
        self.watch(dash(self), "status", self._on_status)

    def _on_status(self, status: dict[str, Any] | None) -> None:
        mine = next((c for c in (status or {}).get("capsules", []) if c["name"] == self.capsule), None)
        if mine != self._last_status or self.detail is None:
            self._last_status = mine
            dash(self).request(f"capsule {self.capsule}", lambda api: api.capsule(self.capsule), self._show, owner=self)

    def _show(self, detail: dict[str, Any]) -> None:
        self.detail = detail
        app = dash(self)
        package = detail.get("package", {})
        title = Text(f"{self.capsule}", style="bold")
        if package.get("name") and package.get("name") != self.capsule:
            title.append(f" ({package['name']})")
        title.append(f"  {package.get('version', '')}  ", style="dim")
        title.append_text(phase_text((detail.get("status") or {}).get("phase", "?")))
        self.query_one("#title", Static).update(title)
        self.query_one("#overview-text", Static).update(overview(detail, app.clock))
        answerable = awaiting_of(detail.get("status")) is not None
        if answerable != self.answerable:
            self.answerable = answerable
            self.refresh_bindings()
        tools = detail.get("tools", [])
        names = [str(t.get("name")) for t in tools]
        options = self.query_one(OptionList)
        if [options.get_option_at_index(i).id for i in range(options.option_count)] != names:
            options.clear_options()
            options.add_options(
                [
                    Option(Text.assemble((name, "bold"), "  ", (t.get("description") or "")), id=name)
                    for name, t in zip(names, tools, strict=True)
                ]
            )
            if tools:
                options.highlighted = 0
        if self.tool is not None:  # keep the chosen tool's schema current after a reload
            self.tool = next((t for t in tools if t.get("name") == self.tool.get("name")), None)
            self._check()

    # -- tools -----------------------------------------------------------------------------
    def on_option_list_option_highlighted(self, event: OptionList.OptionHighlighted) -> None:
        self._choose(event.option.id)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self._choose(event.option.id)
        self.query_one("#args", ArgumentsField).focus()

    def on_arguments_field_step(self, event: ArgumentsField.Step) -> None:
        options = self.query_one(OptionList)
        if options.option_count:
            current = options.highlighted if options.highlighted is not None else 0
            options.highlighted = min(options.option_count - 1, max(0, current + event.delta))

    def _choose(self, name: str | None) -> None:
        tools = (self.detail or {}).get("tools", [])
        tool = next((t for t in tools if t.get("name") == name), None)
        if tool is None or tool is self.tool:
            return
        self.tool = tool
        self.query_one("#tool-doc", Static).update(
            Text.assemble((str(tool.get("name")), "bold"), "  ", str(tool.get("description") or ""))
        )
        self.query_one("#args", ArgumentsField).border_subtitle = str(tool.get("name"))
        schema = JSON(json.dumps(tool.get("input_schema") or {}), indent=2)
        self.query_one("#tool-schema", Static).update(Group(Text("input schema", style="dim"), schema))
        self.query_one("#tool-output", Static).update("")
        self._check()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "args":
            self._check()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "args":
            self.action_run()

    # -- checking, on a worker thread --------------------------------------------------------
    def _check(self) -> None:
        """Check what the field holds now against the chosen tool (soon: on a thread)."""
        self._wanted = (self.query_one("#args", ArgumentsField).value, self.tool)
        if not self.checking:
            self.checking = True
            self.run_worker(self._check_newest(), group="check")

    def _is_current(self, checked: Checked | None) -> bool:
        text, tool = self._wanted
        return checked is not None and checked.text == text and checked.tool is tool

    async def _check_newest(self) -> None:
        """Check until the newest text is checked, then send it if `enter` asked for that."""
        try:
            while not self._is_current(self.checked):
                text, tool = self._wanted
                if tool is None:
                    checked = Checked(text, None, None, ())
                else:
                    try:
                        value, problems = await asyncio.to_thread(
                            check_arguments,
                            text,
                            tool.get("input_schema"),
                            capsule=self.capsule,
                            tool=str(tool.get("name")),
                        )
                    except Exception as error:  # never lets a bad schema take the dashboard down
                        logger.warning("checking arguments for %s.%s: %r", self.capsule, tool.get("name"), error)
                        value, problems = None, [f"cannot check these arguments: {type(error).__name__}: {error}"]
                    checked = Checked(text, tool, value, tuple(problems))
                self.checked = checked
                self._show_check(checked)
        finally:
            self.checking = False
        if self._run_when_checked:
            self._run_when_checked = False
            self._send(self.checked)

    def _show_check(self, checked: Checked) -> None:
        field = self.query_one("#args", ArgumentsField)
        shown = self.query_one("#args-problem", Static)
        field.set_class(bool(checked.problems), "-invalid")
        if checked.problems:
            shown.update(Text("✖ " + "\n✖ ".join(checked.problems), style="red"))
        elif checked.tool is not None:
            shown.update(Text("✔ valid: enter runs it", style="green"))
        else:
            shown.update("")

    # -- running -------------------------------------------------------------------------------
    def action_run(self) -> None:
        if self.tool is None:
            self.notify("choose a tool first", severity="warning")
            return
        self._run_when_checked = True
        if self._is_current(self.checked) and not self.checking:
            self._run_when_checked = False
            self._send(self.checked)
        else:
            self.query_one("#tool-output", Static).update(Text("checking the arguments…", style="dim"))
            self._check()

    def _send(self, checked: Checked | None) -> None:
        if checked is None or checked.tool is None:
            return
        output = self.query_one("#tool-output", Static)
        if checked.problems:
            output.update(Text("not sent: fix the arguments first", style="yellow"))
            return
        name = str(checked.tool.get("name"))
        body = json.dumps(checked.value).encode()
        output.update(Text(f"running {name}…", style="dim"))

        def done(result: tuple[bytes, dict[str, str]] | None) -> None:
            if result is not None:
                output.update(tool_result(name, *result))

        async def call(api: Any) -> tuple[bytes, dict[str, str]] | None:
            try:
                result: tuple[bytes, dict[str, str]] = await api.call(self.capsule, name, body)
            except Exception as error:
                answer = remote_error(error)
                if answer is None:
                    raise
                message = " ".join(str(answer).split())  # the tool failed: say so where the output goes
                output.update(Text(f"✖ {name} failed ({answer.status} {answer.kind}): {message}", style="red"))
                return None
            return result

        dash(self).request(f"{self.capsule}.{name}", call, done, owner=self)

    # -- other actions ---------------------------------------------------------------------
    def action_back(self) -> None:
        if isinstance(self.focused, Input):
            self.query_one(OptionList).focus()
        else:
            self.app.pop_screen()

    def action_kv(self) -> None:
        from .kv import KVScreen

        self.app.push_screen(KVScreen(self.capsule))

    def action_restart(self) -> None:
        dash(self).restart(self.capsule)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`a` and `x` only while the capsule awaits approval (else not in the footer)."""
        return self.answerable if action in ("approve", "reject") else True

    def action_approve(self) -> None:
        self._answer(approve=True)

    def action_reject(self) -> None:
        self._answer(approve=False)

    def _answer(self, *, approve: bool) -> None:
        awaiting = awaiting_of((self.detail or {}).get("status"))
        if awaiting is not None:
            self.app.push_screen(AnswerDialog(self.capsule, awaiting, approve=approve))


def tool_result(name: str, data: bytes, headers: dict[str, str]) -> RenderableType:
    """`✔ increment · fuel 60,473 · 2.2 ms` above the output, pretty when it is JSON."""
    fuel = headers.get("X-Fuel-Used") or headers.get("x-fuel-used")
    seconds = headers.get("X-Seconds") or headers.get("x-seconds")
    head = Text(f"✔ {name}", style="bold green")
    if fuel is not None:
        head.append(f"  ·  fuel {int(fuel):,}")
    if seconds is not None:
        head.append(f"  ·  {float(seconds) * 1000:.1f} ms", style="dim")
    if headers.get("X-Host"):  # a lattice call: the host that ran it
        head.append(f"  ·  on {headers['X-Host']}", style="dim")
    body: RenderableType
    if not data.strip():
        body = Text("(empty output)", style="dim")
    elif not is_text(data):
        body = Text(hexdump(data))
    else:
        text = data.decode("utf-8")
        try:
            body = JSON(text, indent=2)
        except ValueError:
            body = Text(text)
    return Group(head, body)
