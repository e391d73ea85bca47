"""The home screen: every capsule in a table keyed by its name, updated cell by cell in
place as the status changes (no clear-and-refill), with the counts by phase, a `/` filter,
an unhealthy-only toggle, sorting, and the selected capsule's details (its last error in
full, or what it would be granted while it awaits approval) beside or below the table; `a`
and `x` approve or reject the selected capsule's change while it awaits approval
(tui.approvals). On a lattice (`orch dash --lattice`) a `host` column after the phase says
where each capsule serves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Static

from .approvals import AnswerDialog, awaiting_of, awaiting_text, rejected_text
from .format import (
    Clock,
    compact,
    counters,
    error_origin,
    hosts_cell,
    is_healthy,
    lattice_of,
    phase_counts,
    phase_rank,
    phase_text,
)
from .shell import dash
from .widgets import COMMON_KEYS, DashScreen, TopBar

# column key -> label; the sort key of each, over one capsule's status
COLUMNS: list[tuple[str, str]] = [
    ("name", "name"),
    ("phase", "phase"),
    ("version", "version"),
    ("instances", "inst"),
    ("calls", "calls"),
    ("errors", "err"),
    ("fuel", "fuel"),
    ("reloaded", "reload"),
    ("retry", "retry"),
]
SORT_KEYS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "name": lambda c: c["name"],
    "phase": lambda c: (phase_rank(c["phase"]), c["name"]),
    "version": lambda c: c.get("version") or "",
    "instances": lambda c: c.get("instances", 0),
    "calls": lambda c: c.get("calls", 0),
    "errors": lambda c: c.get("errors", 0),
    "fuel": lambda c: c.get("fuel_mean", 0),
    "reloaded": lambda c: c.get("reload_count", 0),
    "retry": lambda c: c.get("next_retry_ms") or 0,
    "hosts": hosts_cell,
}
HOST_COLUMN = ("hosts", "host")  # on a lattice only, after the phase
Cells = dict[str, Text]


def row_cells(capsule: dict[str, Any], clock: Clock, last_reload_ms: int | None) -> Cells:
    """What one capsule's row shows."""
    reloads = int(capsule.get("reload_count", 0))
    reloaded = f"{reloads}×" if reloads else "-"  # how many, when no reload event was seen
    if last_reload_ms:
        reloaded = clock.ago(last_reload_ms).removesuffix(" ago")
    errors = int(capsule.get("errors", 0))
    phase = phase_text(capsule["phase"], short=True)
    phase.end = ""
    return {
        "name": cell(capsule["name"]),
        "phase": phase,
        "version": cell((capsule.get("version") or "-")[:8]),
        "instances": cell(str(capsule.get("instances", 0))),
        "calls": cell(compact(capsule.get("calls", 0))),
        "errors": cell(compact(errors), "red" if errors else ""),
        "fuel": cell(compact(capsule.get("fuel_mean", 0)) if capsule.get("calls") else "-"),
        "reloaded": cell(reloaded),
        "retry": cell(clock.until(capsule.get("next_retry_ms")) or "-", "yellow"),
    }


def cell(value: str, style: str = "") -> Text:
    """Plain text (never markup) for a table cell."""
    return Text(value, style=style, end="", no_wrap=True)


class CapsuleTable(DataTable[Text]):
    """The capsules table; enter opens the capsule under the cursor."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("enter", "select_cursor", "Open")]


class CapsulesScreen(DashScreen):
    """Home: the capsules table."""

    BINDINGS: ClassVar[list[BindingType]] = [
        *COMMON_KEYS,
        Binding("enter", "open", "Open", show=False),
        Binding("e", "app.events", "Events"),
        Binding("k", "kv", "KV"),
        Binding("p", "app.plan", "Plan"),
        Binding("r", "app.reconcile", "Reconcile"),
        Binding("R", "restart", "Restart"),
        Binding("a", "approve", "Approve"),  # only while the selected capsule awaits approval
        Binding("x", "reject", "Reject"),
        Binding("slash", "filter", "Filter"),
        Binding("u", "unhealthy", "Unhealthy"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse", show=False),
        Binding("escape", "clear_filter", "Clear filter", show=False),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.shown: dict[str, Cells] = {}  # name -> the cells on screen now
        self.capsules: dict[str, dict[str, Any]] = {}  # name -> its latest status
        self.name_filter = ""
        self.unhealthy_only = False
        self.sort_column = "name"
        self.sort_reverse = False
        self.answerable = False  # the selected capsule awaits approval: `a` and `x` work
        self.lattice = False  # the status comes from a lattice: the host column shows
        self.columns = COLUMNS  # the table's columns now

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Static(id="summary")
        with Horizontal(id="home-body"):
            yield CapsuleTable(id="capsules", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="preview"):
                yield Static(id="preview-text")
        yield Input(placeholder="filter capsules by name (enter: keep, esc: clear)", id="filter")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        self._set_columns()
        self.query_one("#filter", Input).display = False
        self._show_summary()
        self._show_preview()
        self.watch(dash(self), "status", self._on_status)
        table.focus()

    # -- the table -------------------------------------------------------------------------
    def _on_status(self, status: dict[str, Any] | None) -> None:
        if status is None:
            return
        if (lattice_of(status) is not None) != self.lattice:
            self.lattice = not self.lattice
            self._set_columns()
        self.capsules = {c["name"]: c for c in status.get("capsules", [])}
        self._render_rows()

    def _set_columns(self) -> None:
        """The columns for one orchestrator, or for a lattice (with `host`): set afresh."""
        table = self.query_one(DataTable)
        table.clear(columns=True)
        self.shown = {}
        self.columns = [*COLUMNS[:2], HOST_COLUMN, *COLUMNS[2:]] if self.lattice else COLUMNS
        for key, label in self.columns:
            table.add_column(label, key=key)
        if self.sort_column not in dict(self.columns):
            self.sort_column, self.sort_reverse = "name", False

    def _wanted(self, capsule: dict[str, Any]) -> bool:
        if self.unhealthy_only and is_healthy(capsule["phase"]):
            return False
        return self.name_filter.casefold() in capsule["name"].casefold()

    def _render_rows(self) -> None:
        """Bring the table to the latest status: remove, add, and update only changed cells."""
        app = dash(self)
        table = self.query_one(DataTable)
        wanted = {name: c for name, c in self.capsules.items() if self._wanted(c)}
        added = False
        with app.batch_update():
            for name in [n for n in self.shown if n not in wanted]:
                table.remove_row(name)
                del self.shown[name]
            for name, capsule in wanted.items():
                cells = row_cells(capsule, app.clock, app.feed.last_reload_ms.get(name))
                if self.lattice:
                    cells["hosts"] = cell(hosts_cell(capsule), "" if capsule.get("hosts") else "yellow")
                old = self.shown.get(name)
                if old is None:
                    table.add_row(*(cells[key] for key, _ in self.columns), key=name)
                    added = True
                else:
                    for key, value in cells.items():
                        if old[key] != value:
                            table.update_cell(name, key, value, update_width=True)
                self.shown[name] = cells
            if added or self.sort_column != "name":
                self._sort()
        self._show_summary()
        self._show_preview()

    def _sort(self) -> None:
        table = self.query_one(DataTable)
        selected = self._selected()
        by = SORT_KEYS[self.sort_column]
        capsules = self.capsules
        table.sort("name", key=lambda name: by(capsules[name.plain]), reverse=self.sort_reverse)
        if selected in self.shown:
            table.move_cursor(row=table.get_row_index(selected), animate=False)

    def _selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return str(row_key.value)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_preview()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self._open(str(event.row_key.value))

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        self.sort_reverse = not self.sort_reverse if column == self.sort_column else False
        self.sort_column = column
        self._sort()
        self._show_summary()

    # -- around the table ------------------------------------------------------------------
    def _show_summary(self) -> None:
        if dash(self).status is None:
            self.query_one("#summary", Static).update(Text("waiting for the orchestrator…", style="dim"))
            return
        phases = [c["phase"] for c in self.capsules.values()]
        line = phase_counts(phases)
        notes = []
        if self.name_filter:
            notes.append(f"filter “{self.name_filter}”")
        if self.unhealthy_only:
            notes.append("unhealthy only")
        hidden = len(self.capsules) - len(self.shown)
        if hidden:
            notes.append(f"{hidden} hidden")
        notes.append(f"sort {dict(self.columns)[self.sort_column]} {'↑' if self.sort_reverse else '↓'}")
        line.append("   " + " · ".join(notes), style="dim")
        self.query_one("#summary", Static).update(line)

    def _show_preview(self) -> None:
        app = dash(self)
        name = self._selected()
        capsule = self.capsules.get(name or "")
        text = Text()
        if capsule is None:
            text.append("no capsule selected" if self.capsules else "waiting for the orchestrator…", style="dim")
        else:
            text.append(capsule["name"], style="bold")
            text.append("  ")
            text.append_text(phase_text(capsule["phase"]))
            text.append(f" {app.clock.ago(capsule.get('since_ms'))}\n", style="dim")
            awaiting, rejected = awaiting_of(capsule), capsule.get("rejected")
            if awaiting is not None:  # first: it is what the operator must answer
                text.append_text(awaiting_text(awaiting, app.clock))
                text.append("\n")
            elif isinstance(rejected, dict):
                text.append_text(rejected_text(rejected, app.clock))
                text.append("\n")
            text.append(f"version {capsule.get('version') or '-'}  ·  {capsule.get('reload_count', 0)} reload(s)\n")
            text.append(
                f"{capsule.get('calls', 0)} call(s), {capsule.get('errors', 0)} error(s), "
                f"fuel/call {compact(capsule.get('fuel_mean', 0))} (last {compact(capsule.get('fuel_last', 0))})\n"
            )
            more = counters(capsule)
            if more:
                text.append(more + "\n", style="yellow")
            if self.lattice:
                text.append(f"hosts {', '.join(map(str, capsule.get('hosts') or [])) or 'none'}")
                wants = f"wants {capsule.get('wanted', '?')}" if capsule.get("enabled") is not False else "disabled"
                text.append(f" ({wants})\n", style="dim")
            if capsule.get("next_retry_ms"):
                text.append(f"next retry {app.clock.until(capsule['next_retry_ms'])}\n", style="yellow")
            if capsule.get("last_error"):
                origin = error_origin(capsule, app.clock)
                text.append(f"last error ({origin}): " if origin else "last error: ", style="bold red")
                text.append(str(capsule["last_error"]), style="red")
            else:
                text.append("no error", style="dim")
        self.query_one("#preview-text", Static).update(text)
        answerable = awaiting_of(capsule) is not None
        if answerable != self.answerable:
            self.answerable = answerable
            self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """`a` and `x` only while the selected capsule awaits approval (else not in the footer)."""
        return self.answerable if action in ("approve", "reject") else True

    # -- actions ---------------------------------------------------------------------------
    def _open(self, name: str | None) -> None:
        from .detail import CapsuleScreen

        if name:
            self.app.push_screen(CapsuleScreen(name))

    def action_open(self) -> None:
        self._open(self._selected())

    def action_kv(self) -> None:
        from .kv import KVScreen

        name = self._selected()
        if name:
            self.app.push_screen(KVScreen(name))

    def action_restart(self) -> None:
        name = self._selected()
        if name:
            dash(self).restart(name)

    def action_approve(self) -> None:
        self._answer(approve=True)

    def action_reject(self) -> None:
        self._answer(approve=False)

    def _answer(self, *, approve: bool) -> None:
        name = self._selected()
        awaiting = awaiting_of(self.capsules.get(name or ""))
        if name and awaiting is not None:
            self.app.push_screen(AnswerDialog(name, awaiting, approve=approve))

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        field.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.name_filter = event.value.strip()
        self._render_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        field = self.query_one("#filter", Input)
        field.display = bool(field.value)
        self.query_one(DataTable).focus()

    def action_clear_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value = ""
        field.display = False
        self.query_one(DataTable).focus()

    def action_unhealthy(self) -> None:
        self.unhealthy_only = not self.unhealthy_only
        self._render_rows()

    def action_sort(self) -> None:
        keys = [key for key, _ in self.columns]
        self.sort_column = keys[(keys.index(self.sort_column) + 1) % len(keys)]
        self.sort_reverse = False
        self._sort()
        self._show_summary()

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._sort()
        self._show_summary()
