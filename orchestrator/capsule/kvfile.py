"""The KV database file itself: the checks before it is opened, and `orch validate`'s check.

`prepare_database` runs before the store connects (orchestrator.capsule.store): it names
the real cause of what would otherwise surface as SQLite's "unable to open database file"
(a directory where the file should be, a state dir that is read-only, a file that cannot
be written), creates the file private to its user (0600; SQLite gives the -wal and -shm
files the same mode), refuses a file that is not an SQLite database or fails
`PRAGMA quick_check`, and creates the tables (the KV's and its snapshots') or adds the
per-value checksums to a database from before them. `check_database` checks an existing
file without opening it for writing: structure and every value's checksum. Both answer
with one line that names the file and what to do, or None.

Standard-library sqlite3 only (aiosqlite stays in store.py). Used by
orchestrator.capsule.store, and by the CLI's `orch validate` through `check_database`.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import tempfile
import zlib
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    capsule TEXT NOT NULL,
    key     TEXT NOT NULL,
    value   BLOB NOT NULL,
    crc     INTEGER,
    PRIMARY KEY (capsule, key)
) WITHOUT ROWID
"""
SNAPSHOT_SCHEMA = (  # orchestrator.capsule.snapshots
    """CREATE TABLE IF NOT EXISTS kv_snapshot (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        capsule    TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        keys       INTEGER NOT NULL,
        bytes      INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS kv_snapshot_rows (
        snapshot INTEGER NOT NULL,
        key      TEXT NOT NULL,
        value    BLOB NOT NULL,
        crc      INTEGER,
        PRIMARY KEY (snapshot, key)
    ) WITHOUT ROWID""",
)
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26  # primary result codes
RECOVER = "move it aside (the store then starts empty) or restore it from a backup"


def crc(value: bytes) -> int:
    """The checksum stored beside each value (CRC-32)."""
    return zlib.crc32(value)


def prepare_database(path: Path) -> str | None:
    """Make `path` ready for the store to open; the problem in one line, or None."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the state dir {folder} for the KV database: {error.strerror}"
    problem = _file_problem(path)
    if problem is not None:
        return problem
    try:  # SQLite creates the -wal and -shm files beside the database
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".kv-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        return (
            f"the state dir {folder} is not writable ({error.strerror}), so the KV database {path} "
            "cannot be opened: make the folder writable, or choose another state_dir"
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)
    except FileExistsError:
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as error:
            return (
                f"the KV database {path} cannot be opened for writing ({error.strerror}): "
                "check its owner and permissions"
            )
    except OSError as error:
        return f"cannot create the KV database {path}: {error.strerror}"
    os.close(fd)
    try:
        db = sqlite3.connect(path)
    except sqlite3.Error as error:
        return f"cannot open the KV database {path}: {error}"
    try:
        problem = _integrity(db, path)
        if problem is not None:
            return problem
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(SCHEMA)
        for statement in SNAPSHOT_SCHEMA:
            db.execute(statement)
        if "crc" not in _columns(db):  # a database from before checksums: add them
            db.create_function("kv_crc32", 1, lambda value: crc(bytes(value)), deterministic=True)
            db.execute("ALTER TABLE kv ADD COLUMN crc INTEGER")
            db.execute("UPDATE kv SET crc = kv_crc32(value)")
        db.commit()
    except sqlite3.Error as error:
        return f"cannot prepare the KV database {path}: {error}"
    finally:
        db.close()
    return None


def check_database(path: Path) -> str | None:
    """Check an existing KV database read-only (`orch validate`): its structure
    (`PRAGMA quick_check`) and every value's checksum. The problem in one line naming the
    file and what to do, or None when it is sound or does not exist yet."""
    path = Path(path)
    problem = _file_problem(path)
    if problem is not None or not path.exists():
        return problem
    uri = f"{path.resolve().as_uri()}?mode=ro"
    if not Path(f"{path}-wal").exists():  # nobody has it open: it cannot change under us, and
        uri += "&immutable=1"  # needs no -shm file (which a read-only folder could not hold)
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error as error:
        return f"cannot open the KV database {path} read-only: {error}"
    try:
        problem = _integrity(db, path)
        if problem is not None or "crc" not in _columns(db):
            return problem  # a database from before checksums (or an empty one): opening adds them
        damaged = 0
        first: tuple[str, str] | None = None
        for capsule, key, value, stored in db.execute("SELECT capsule, key, value, crc FROM kv"):
            if stored is not None and crc(bytes(value)) != stored:
                damaged += 1
                first = first or (capsule, key)
        if first is not None:
            return (
                f"the KV database {path} is damaged: {damaged} value(s) fail their checksum "
                f"(first: capsule {_shown(first[0])} key {_shown(first[1])}): {RECOVER}"
            )
        return None
    except sqlite3.Error as error:
        return f"cannot check the KV database {path}: {error}"
    finally:
        db.close()


def _file_problem(path: Path) -> str | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"cannot reach the KV database {path}: {error.strerror}"
    if stat.S_ISDIR(info.st_mode):
        return f"{path} is a directory, not the KV database: move it aside (the store then starts empty)"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file, so it cannot be the KV database: move it aside"
    return None


def _shown(name: object) -> str:
    """A name read from a damaged file, quoted and cut short."""
    text = repr(str(name))
    return text if len(text) <= 60 else text[:57] + "..."


def _columns(db: sqlite3.Connection) -> set[str]:
    return {str(row[1]) for row in db.execute("PRAGMA table_info(kv)")}


def _integrity(db: sqlite3.Connection, path: Path) -> str | None:
    """What `PRAGMA quick_check` finds wrong, in one line; None when the file is sound."""
    try:
        rows = db.execute("PRAGMA quick_check").fetchall()
    except sqlite3.Error as error:
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        if code == SQLITE_NOTADB:
            return f"{path} is not an SQLite database: {RECOVER}"
        if code == SQLITE_CORRUPT:
            return f"the KV database {path} is corrupt ({error}): {RECOVER}"
        return f"cannot read the KV database {path}: {error}"
    found = [str(row[0]) for row in rows if row and row[0] != "ok"]
    if not found:
        return None
    first = " ".join(found[0].split())[:160]
    more = f" and {len(found) - 1} more problem(s)" if len(found) > 1 else ""
    return f"the KV database {path} is corrupt (quick_check: {first}{more}): {RECOVER}"
