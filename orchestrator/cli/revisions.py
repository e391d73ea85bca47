"""The desired state at a git revision, for the verbs that take `git+URL#REV:PATH`
(`orch plan`, `orch validate`, `orch apply --lattice`): a temporary clone, validated strictly.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..desired import DesiredState


@contextlib.contextmanager
def git_revision(source: str, *, state_dir: Path) -> Iterator[tuple[DesiredState, str]]:
    """The desired state of the revision `source` names and its commit, from a temporary
    clone (removed afterwards), validated strictly. Raises RevisionRejected (a ConfigError)
    or GitSourceError."""
    from ..control.follow import load_revision
    from ..control.gitsource import GitRef, GitSource

    ref = GitRef.parse(source)
    with tempfile.TemporaryDirectory(prefix="orch-plan-") as folder:
        clone = GitSource(ref, Path(folder))
        checkout = clone.checkout(clone.fetch())
        yield load_revision(checkout, state_dir=state_dir.absolute(), workspace=Path.cwd()), checkout.commit
