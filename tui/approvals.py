"""Answering the escalation gate from the dashboard: what a capsule awaiting approval would be
granted, and the dialog that approves or rejects exactly that change.

`a` (approve) and `x` (reject), on the capsules view and on a capsule's screen, open an
`AnswerDialog` for the capsule when it is `AwaitingApproval` (the keys show in the footer
only then): the change's spec hash, what it would grant and since when. `y` sends the
answer for that very change: the request names its spec hash, so if another change has
arrived meanwhile the orchestrator refuses (409) instead of granting something nobody looked
at. `n` or escape cancels.

Pure rendering of what the API sends, and one modal screen; used by tui.capsules and
tui.detail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Static

from .format import Clock, phase_word
from .shell import dash


def awaiting_of(capsule: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The change `capsule` (its status) waits approval for, if any and well formed."""
    awaiting = (capsule or {}).get("awaiting")
    if (
        isinstance(awaiting, dict)
        and isinstance(awaiting.get("spec_hash"), str)
        and isinstance(awaiting.get("escalations"), list)
    ):
        return awaiting
    return None


def grants_text(change: Mapping[str, Any], *, indent: str = "  ") -> Text:
    """One line per capability the change grants: `+ fs_write cwd://out`."""
    text = Text()
    for escalation in change.get("escalations", []):
        if text:
            text.append("\n")
        text.append(f"{indent}+ {' '.join(str(escalation).split())}", style="bold yellow")
    return text


def awaiting_text(awaiting: Mapping[str, Any], clock: Clock) -> Text:
    """What a capsule awaiting approval would be granted, and how to answer."""
    text = Text(f"change {str(awaiting.get('spec_hash'))[:12]} would grant:\n", style="yellow")
    text.append_text(grants_text(awaiting))
    since = awaiting.get("since_ms")
    if isinstance(since, int) and not isinstance(since, bool) and since > 0:
        text.append(f"\nwaiting since {clock.hms(since)[:8]} ({clock.ago(since)})", style="dim")
    text.append("\na approves · x rejects", style="dim")
    return text


def rejected_text(rejected: Mapping[str, Any], clock: Clock) -> Text:
    """A change the operator rejected: it stays refused until the capsule's files change."""
    text = Text(f"change {str(rejected.get('spec_hash'))[:12]} rejected", style="red")
    at = rejected.get("at_ms")
    if isinstance(at, int) and not isinstance(at, bool) and at > 0:
        text.append(f" {clock.ago(at)}", style="dim")
    text.append(", it would have granted:\n", style="red")
    text.append_text(grants_text(rejected))
    return text


class AnswerDialog(ModalScreen[None]):
    """Approve (or reject) the change a capsule waits approval for: `y` does it, `n` cancels."""

    DEFAULT_CSS = """
    AnswerDialog #answer {
        width: 90%;
        max-width: 90;
        height: auto;
        max-height: 80%;
        border: round $warning;
        background: $surface;
        padding: 0 1;
    }
    AnswerDialog #answer Footer {
        dock: none;
    }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "confirm", "Yes"),
        Binding("n", "dismiss", "No"),
        Binding("escape", "dismiss", "Cancel"),
    ]

    def __init__(self, capsule: str, awaiting: Mapping[str, Any], *, approve: bool) -> None:
        super().__init__()
        self.capsule = capsule
        self.awaiting = dict(awaiting)
        self.approve = approve

    def compose(self) -> ComposeResult:
        verb = "Approve" if self.approve else "Reject"
        spec_hash = str(self.awaiting.get("spec_hash"))
        body = Text(f"{verb} the change to {self.capsule}? ", style="bold")
        body.append(f"(spec {spec_hash[:12]})\n", style="dim")
        body.append("It would grant:\n")
        body.append_text(grants_text(self.awaiting))
        if self.approve:
            body.append("\n\nApproving starts it at once (a reload swaps it in beside the old version).")
        else:
            body.append("\n\nRejecting keeps what runs; this change stays refused until the capsule's files change.")
        with Vertical(id="answer"):
            yield Static(body, id="answer-text")
            yield Footer(compact=True)

    def action_confirm(self) -> None:
        app = dash(self)
        name, spec_hash, approve = self.capsule, str(self.awaiting.get("spec_hash")), self.approve
        self.dismiss()

        def done(status: Any) -> None:
            phase = phase_word(str(status.get("phase", "?")))
            if approve:
                app.notify(f"{name}: approved; {phase} version {status.get('version') or '-'}")
            else:
                app.notify(f"{name}: rejected; {phase}")

        if approve:
            app.request(f"approve {name}", lambda api: api.approve(name, spec_hash), done)
        else:
            app.request(f"reject {name}", lambda api: api.reject(name, spec_hash), done)
