"""The content-addressed artifact store: every version's .wasm bytes, by sha256, in the state dir.

A rollback runs an earlier version from the bytes that version ran, not from the capsule
folder (which has moved on). The version history (orchestrator.control.history) puts a
module's bytes here when a version first runs, and removes the files no history entry
refers to any more, so the store is bounded with the history.

Layout: `<state_dir>/artifacts/<sha256>.wasm`; the folder is private (0700) and every file
is created 0600, written to a temporary name and renamed into place. A file is trusted for
nothing: `get` checks its sha256 against its name and answers None for a file that is
missing, not a regular file, too large or altered. Names are checked before they become
paths (64 lowercase hex digits), so a damaged history file cannot point outside the folder.

Blocking file I/O: callers on the event loop run it on a worker thread. Used by the version
history and the rollback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Collection
from pathlib import Path

from ..files import FileReadError, read_regular, write_atomic

logger = logging.getLogger(__name__)

ARTIFACTS = "artifacts"
SHA256 = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".wasm"
MAX_ARTIFACT_BYTES = 1 << 30  # beyond any engine.max_module_mib


def valid_digest(digest: object) -> bool:
    return isinstance(digest, str) and SHA256.fullmatch(digest) is not None


class ArtifactStore:
    """Module bytes by sha256 under `folder` (created private on first write)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._sound: set[str] = set()  # written or checked by this process

    def path(self, digest: str) -> Path:
        if not valid_digest(digest):
            raise ValueError(f"not a sha256 digest: {digest[:80]!r}")
        return self.folder / f"{digest}{SUFFIX}"

    def put(self, digest: str, data: bytes) -> bool:
        """Store `data` under `digest` unless a sound copy is there (checked once per
        process: a version that runs again costs nothing); whether it wrote. Raises
        ValueError when `data` does not hash to `digest`, OSError when it cannot write."""
        path = self.path(digest)
        if digest in self._sound and path.is_file():
            return False
        if self.get(digest) is not None:
            self._sound.add(digest)
            return False
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"the bytes given for artifact {digest[:12]} do not hash to it")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, data)
        self._sound.add(digest)
        return True

    def get(self, digest: str) -> bytes | None:
        """The bytes stored under `digest`, or None when there are none that hash to it."""
        if not valid_digest(digest):
            return None
        path = self.path(digest)
        try:
            data, _ = read_regular(path, limit=MAX_ARTIFACT_BYTES, what="module artifact")
        except FileReadError as error:
            if os.path.lexists(path):
                logger.warning("ignoring the module artifact %s: %s", path, error.reason)
            return None
        if hashlib.sha256(data).hexdigest() != digest:
            logger.warning("ignoring the module artifact %s: its bytes do not match its name (altered?)", path)
            return None
        return data

    def has(self, digest: str) -> bool:
        return valid_digest(digest) and self.path(digest).is_file()

    def keep_only(self, digests: Collection[str]) -> list[str]:
        """Remove every artifact not in `digests` (and leftovers of interrupted writes);
        returns the digests removed."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            digest = name[: -len(SUFFIX)] if name.endswith(SUFFIX) else ""
            if digest in digests and valid_digest(digest):
                continue
            try:
                os.unlink(self.folder / name)
            except IsADirectoryError:
                continue
            except OSError as error:
                logger.warning("could not remove %s: %s", self.folder / name, error.strerror or error)
                continue
            if valid_digest(digest):
                removed.append(digest)
        return removed
