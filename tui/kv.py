"""A capsule's key-value store: its keys by prefix, each value as text or hex, refreshed on
demand (`r`). Read-only: writes belong to the capsule (and to `orch kv set`).
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Input, Label, Static

from .format import hexdump, is_text, preview
from .shell import dash
from .widgets import COMMON_KEYS, DashScreen, TopBar

MAX_KEYS = 500  # keys whose values are fetched for the table


class KVScreen(DashScreen):
    BINDINGS: ClassVar[list[BindingType]] = [
        *COMMON_KEYS,
        Binding("escape", "back", "Back"),
        Binding("r", "refresh", "Refresh"),
        Binding("slash", "prefix", "Prefix"),
        Binding("x", "hex", "Text/hex"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.capsule = name
        self.values: dict[str, bytes] = {}
        self.hex = False
        self.total = 0

    def compose(self) -> ComposeResult:
        yield TopBar()
        yield Static(id="title")
        with Horizontal(id="kv-prefix"):
            yield Label("prefix")
            yield Input(placeholder="(all keys)", id="prefix")
        with Horizontal(id="kv-body"):
            yield DataTable(id="keys", cursor_type="row", zebra_stripes=True)
            with VerticalScroll(id="kv-value"):
                yield Static(id="value")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        table.add_column("key", key="key")
        table.add_column("bytes", key="bytes")
        table.add_column("value", key="value")
        table.focus()
        self.action_refresh()

    def action_refresh(self) -> None:
        prefix = self.query_one("#prefix", Input).value
        name = self.capsule

        async def fetch(api: Any) -> tuple[int, dict[str, bytes]]:
            keys = [str(k) for k in (await api.kv_list(name, prefix))["keys"]]
            shown = keys[:MAX_KEYS]
            values = await asyncio.gather(*(api.kv_get(name, key) for key in shown))
            return len(keys), dict(zip(shown, values, strict=True))

        dash(self).request(f"kv {name}", fetch, self._show, owner=self)

    def _show(self, result: tuple[int, dict[str, bytes]]) -> None:
        self.total, self.values = result
        table = self.query_one(DataTable)
        selected = self._selected()
        table.clear()
        for key, value in self.values.items():
            table.add_row(key, f"{len(value):,}", preview(value, 48), key=key)
        if selected in self.values:
            table.move_cursor(row=table.get_row_index(selected), animate=False)
        title = Text(f"KV of {self.capsule}", style="bold")
        prefix = self.query_one("#prefix", Input).value
        shown = f"{len(self.values)} of {self.total}" if self.total > len(self.values) else f"{self.total}"
        title.append(f"   {shown} key(s){f' starting {prefix!r}' if prefix else ''}", style="dim")
        self.query_one("#title", Static).update(title)
        self._show_value()

    def _selected(self) -> str | None:
        table = self.query_one(DataTable)
        if not table.row_count:
            return None
        return str(table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value)

    def _show_value(self) -> None:
        key = self._selected()
        box = self.query_one("#value", Static)
        if key is None or key not in self.values:
            box.update(Text("no keys" if not self.values else "", style="dim"))
            return
        value = self.values[key]
        head = Text(key, style="bold")
        if self.hex or not is_text(value):
            head.append(f"  {len(value):,} bytes, hex\n", style="dim")
            head.append(hexdump(value))
        else:
            head.append(f"  {len(value):,} bytes, text\n", style="dim")
            head.append(value.decode("utf-8"))
        box.update(head)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self._show_value()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_refresh()
        self.query_one(DataTable).focus()

    def action_prefix(self) -> None:
        self.query_one("#prefix", Input).focus()

    def action_hex(self) -> None:
        self.hex = not self.hex
        self._show_value()

    def action_back(self) -> None:
        if isinstance(self.focused, Input):
            self.query_one(DataTable).focus()
        else:
            self.app.pop_screen()
