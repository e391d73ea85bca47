"""Dialogs over any screen: the current plan (what a reconcile would do now, with reasons;
escalations, capabilities a reload would add, stand out), the desired state's problems (a
rejected config.yaml, broken manifests, failed builds, in full: tui.health) and the help
(every key of the screen below, and what the phase symbols mean).
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Static

from .format import PHASE_ORDER, PHASES, phase_word
from .health import read_health, report
from .shell import dash

SYMBOLS = {"start": "+", "reload": "~", "stop": "-", "keep": "="}
ACTION_STYLE = {"start": "green", "reload": "cyan", "stop": "magenta", "keep": "dim"}


def plan_text(plan: dict[str, Any]) -> RenderableType:
    """One row per action (`~ notes  reload  wasm 3fa1c2→9b07de`), a reason a line, and the
    escalations highlighted under them."""
    actions = plan.get("actions", [])
    changes = [a for a in actions if a.get("action") != "keep"]
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for action in actions:
        kind = str(action.get("action"))
        if kind == "keep" and not action.get("reasons"):
            continue
        style = ACTION_STYLE.get(kind, "")
        why = Text("\n".join(action.get("reasons", [])) or "-")
        for escalation in action.get("escalations", []):
            why.append("\n")
            why.append(f"! escalation: {escalation}", style="bold reverse yellow")
        grid.add_row(
            Text(f"{SYMBOLS.get(kind, '?')} {action.get('capsule', '?')}", style=style), Text(kind, style), why
        )
    head = Text()
    if not changes:
        head.append("no changes: what runs is what the files say", style="green")
    kept = len(actions) - len(changes)
    tail = Text(f"{kept} capsule(s) unchanged" if kept else "", style="dim")
    return Group(head, grid, tail) if head else Group(grid, tail)


class PlanScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("r", "refresh", "Refresh"),
        Binding("a", "apply", "Apply (reconcile)"),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text("Plan: what a reconcile would do now", style="bold"), id="dialog-title")
            with VerticalScroll():
                yield Static("asking the orchestrator…", id="plan")
            yield Footer(compact=True)

    def on_mount(self) -> None:
        self.action_refresh()

    def action_refresh(self) -> None:
        dash(self).request("plan", lambda api: api.plan(), self._show, owner=self)

    def _show(self, plan: dict[str, Any]) -> None:
        self.query_one("#plan", Static).update(plan_text(plan))

    def action_apply(self) -> None:
        app = dash(self)
        self.dismiss()
        app.action_reconcile()


class ProblemsScreen(ModalScreen[None]):
    """`!`: what is wrong with the desired state, kept current as the status changes."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("exclamation_mark", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Static(Text("Desired state: config.yaml, manifests, builds", style="bold"), id="dialog-title")
            with VerticalScroll():
                yield Static(id="problems")
            yield Footer(compact=True)

    def on_mount(self) -> None:
        self.watch(dash(self), "status", self._show)

    def _show(self, status: Any) -> None:
        app = dash(self)
        self.query_one("#problems", Static).update(report(read_health(status), app.clock))


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close"),
    ]

    def __init__(self, below: Screen[Any]) -> None:
        super().__init__()
        self.below = below

    def compose(self) -> ComposeResult:
        keys = Table.grid(padding=(0, 2))
        keys.add_column(style="bold", no_wrap=True)
        keys.add_column()
        seen = set()
        focused = self.below.focused  # its own keys first: expand an event, run a tool, ...
        widget_keys = [b for b in (focused.BINDINGS if focused else []) if isinstance(b, Binding) and b.show]
        for binding in [*widget_keys, *self.below.BINDINGS, *self.app.BINDINGS]:
            assert isinstance(binding, Binding)
            if binding.key in seen:
                continue
            seen.add(binding.key)
            keys.add_row(self.app.get_key_display(binding), binding.description or binding.action)
        legend = Text()
        for phase in PHASE_ORDER:
            symbol, style = PHASES[phase]
            legend.append(f"{symbol} {phase_word(phase)}  ", style=style)
        with Vertical(id="dialog"):
            yield Static(Text(f"Keys: {self.below.__class__.__name__.removesuffix('Screen').lower()}", style="bold"))
            yield Static(legend, id="legend")
            with VerticalScroll():
                yield Static(keys)
            yield Footer(compact=True)
