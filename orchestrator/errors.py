"""The orchestrator's error tree: one base, a few kinds a user can act on.

Every module raises these (never bare wasmtime or OS errors across a layer boundary), so
callers branch on the kind and show the message as it is: each message names what failed
(the file, the plugin, the function, the limit) and, where there is one, what to do.
Used by everything; imports nothing of ours.
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error the orchestrator raises on purpose."""


class GateError(OrchestratorError):
    """Malformed input refused at a boundary (not a denial): a bad key, topic or path
    syntax, or something too large. A host function reports it to the guest as a
    HostResult error; the control API answers 400."""


class InvalidModule(OrchestratorError):
    """A module that cannot be loaded: not wasm, invalid, or importing something we lack."""


class CapsuleError(OrchestratorError):
    """Base of the failures of one call into a plugin.

    `plugin` and `function` say where it happened; `fuel_used` is what the call burned
    before failing (0 when it never ran).
    """

    def __init__(self, message: str, *, plugin: str = "", function: str = "", fuel_used: int = 0) -> None:
        super().__init__(message)
        self.plugin = plugin
        self.function = function
        self.fuel_used = fuel_used


class UnknownFunction(CapsuleError):
    """The plugin exports no callable function of that name (`() -> i32` or `() -> ()`)."""


class GuestError(CapsuleError):
    """The plugin reported a failure: it set an error message or returned non-zero.

    The message is the guest's own text; `exit_code` is the function's return value.
    """

    def __init__(self, message: str, *, exit_code: int = 1, **where: str | int) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.exit_code = exit_code


class CapsuleTrap(CapsuleError):
    """The guest trapped (unreachable, out-of-bounds access, stack overflow, ...).

    `trap_code` is the wasmtime trap code name (e.g. ``UNREACHABLE``), or ``""`` when the
    trap carried none. The instance that trapped is discarded; the plugin keeps working.
    """

    def __init__(self, message: str, *, trap_code: str = "", **where: str | int) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.trap_code = trap_code


class KernelFault(CapsuleTrap):
    """The guest misused the Extism kernel: a store outside its memory, an output or error
    offset that is not an allocated block. Usually a PDK bug or an ignored failed `alloc`."""


class FuelExhausted(CapsuleError):
    """The call burned its whole fuel budget (`budget`) before returning."""

    def __init__(self, message: str, *, budget: int, **where: str | int) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.budget = budget


class CallTimeout(CapsuleError):
    """The call ran past its wall-clock timeout (`timeout_ms`) and was interrupted."""

    def __init__(self, message: str, *, timeout_ms: int, **where: str | int) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.timeout_ms = timeout_ms


class MemoryLimitExceeded(CapsuleError):
    """The call needed more linear memory than the plugin's `memory_mib` allows."""

    def __init__(self, message: str, *, limit_mib: int, **where: str | int) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.limit_mib = limit_mib


class CapabilityDenied(CapsuleError):
    """The plugin asked for something its grants do not allow (`capability`, `target`)."""

    def __init__(self, message: str, *, capability: str, target: str = "", **where: str | int) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.capability = capability
        self.target = target


class PluginClosed(CapsuleError):
    """The plugin was closed; load it again to call it."""


class Problem:
    """One thing wrong in a file: where (file, line when known, field) and what to do."""

    __slots__ = ("field", "file", "line", "message")

    def __init__(self, message: str, *, file: str = "", line: int | None = None, field: str = "") -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field

    def __str__(self) -> str:
        where = self.file + (f":{self.line}" if self.line else "")
        prefix = f"{where}: " if where else ""
        return f"{prefix}{self.field + ': ' if self.field else ''}{self.message}"

    def __repr__(self) -> str:
        return f"Problem({self!s})"


class FileProblems(OrchestratorError):
    """A file that cannot be used as it is; `problems` lists every problem found, one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


class ManifestError(FileProblems):
    """A Capsule.toml (or the capsule folder it describes) is invalid."""


class ToolInputError(OrchestratorError):
    """A tool's arguments do not match its input schema; the guest was not called.

    `field` is the JSON path of the offending value (``""`` for the whole input).
    """

    def __init__(self, message: str, *, tool: str = "", field: str = "") -> None:
        super().__init__(message)
        self.tool = tool
        self.field = field


class UnknownTool(OrchestratorError):
    """The capsule declares no tool of that name."""


class ConfigError(FileProblems):
    """config.yaml is invalid: syntax, unknown keys, bad values, or references (unknown
    depends_on targets, cycles, missing capsule folders, undeclared config keys).

    `partial` is the loaded config when the file itself was well-formed and only its
    references were wrong (so every capsule can still be checked and every problem listed).
    """

    partial: object = None


class StaleSpec(OrchestratorError):
    """A capsule's files changed between planning and loading (a file caught mid-write);
    nothing is applied, and the change event that follows triggers a new attempt."""


class StoreError(OrchestratorError):
    """The KV store could not be opened, read or written (the message says which and why)."""


class KVConflict(StoreError):
    """A call's KV reads kept changing under it, even when run alone; it was not applied
    (nothing of it happened: it may be retried)."""


class CapsuleNotRunning(OrchestratorError):
    """The deployment exists but has no running version (starting, failed or stopped)."""


class UnknownCapsule(OrchestratorError):
    """No deployment of that name in the configuration."""


class SourceError(OrchestratorError):
    """The desired state's source cannot be reached (a git repository that cannot be
    fetched, a revision that cannot be checked out); what runs keeps running."""


HTTP_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (ToolInputError, 400),
    (GateError, 400),
    (CapabilityDenied, 403),
    (UnknownCapsule, 404),
    (UnknownTool, 404),
    (CapsuleNotRunning, 409),
    (GuestError, 422),
    (CapsuleTrap, 422),  # the guest failed (an abort, an out-of-range access, a refused publish)
    (MemoryLimitExceeded, 422),
    (ConfigError, 422),
    (CallTimeout, 504),
    (FuelExhausted, 504),
    (KVConflict, 503),  # the call kept meeting concurrent writes: it may be retried
    (SourceError, 502),  # the git repository (or another source) did not answer as it should
)
"""The status code of each error kind, as the control API (and the lattice's calls) answer."""


def http_status(error: BaseException) -> int:
    """The status code for `error` (500 for anything not named in HTTP_STATUS)."""
    return next((code for kind, code in HTTP_STATUS if isinstance(error, kind)), 500)
