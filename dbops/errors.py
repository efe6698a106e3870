"""Errors and the exit-code table.

Every failure dbops reports is a :class:`DbopsError` (or subclass). The CLI
boundary (``dbops.cli.entry``) is the only place that turns one into a process
exit status. Codes stay below 126: PostgreSQL treats higher statuses from
``archive_command`` / ``restore_command`` as fatal for the server.

Messages follow PostgreSQL's own shape: a one-line ``message``, an optional
``detail`` (facts) and an optional ``hint`` (what to do).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the operation failed (generic)
    USAGE = 2  # bad command line (typer/click use 2 as well)
    CONFIG = 3  # configuration file invalid or missing
    STORAGE = 4  # object storage unreachable, refused, or credentials wrong
    POSTGRES = 5  # PostgreSQL unreachable or returned an error
    LOCKED = 6  # another run holds the lock
    VALIDATION = 7  # a backup or the WAL archive is broken (hash, gap, start failure)
    UNKNOWN = 8  # outcome could not be confirmed
    NOT_FOUND = 9  # the named object / segment / backup does not exist
    TARGET = 10  # a restore target outside what the backups and archive can reach
    PRECONDITION = 11  # the cluster or host is not in a state that allows it (check findings, preflight)
    ROLLED_BACK = 12  # a failover failed and was rolled back: the old primary is primary again
    CONFLICT = 13  # the archive holds different content under this name, or belongs to another cluster
    INTERRUPTED = 14  # interrupted by a signal (Ctrl-C / SIGTERM); cleaned up
    LOSS_POSSIBLE = 15  # failover --primary-lost promoted a standby, but WAL known to exist was not recovered
    ENCRYPTION = 16  # encryption key missing or wrong, or the archive's encryption differs from the configuration
    VALIDATION_ENVIRONMENT = 17  # validation could not run (start timeout, OOM kill, connections, runtime): not the backup's fault


EXIT_CODE_DOC: dict[ExitCode, str] = {
    ExitCode.OK: "success",
    ExitCode.FAILED: "the operation failed (see the message)",
    ExitCode.USAGE: "bad command line: unknown option, missing or malformed argument",
    ExitCode.CONFIG: "configuration file missing or invalid (every error is listed)",
    ExitCode.STORAGE: "object storage unreachable, bucket missing, access refused or wrong credentials",
    ExitCode.POSTGRES: "PostgreSQL unreachable or returned an error",
    ExitCode.LOCKED: "another dbops run holds the lock (its owner is named)",
    ExitCode.VALIDATION: "validation failed: a backup or the WAL archive is broken (hash mismatch, gap, failed start)",
    ExitCode.UNKNOWN: "the outcome could not be confirmed: inspect before acting again",
    ExitCode.NOT_FOUND: "the named WAL segment, backup or object does not exist",
    ExitCode.TARGET: "restore target not reachable: before the oldest backup or past the end of the archive",
    ExitCode.PRECONDITION: "refused: a check or preflight found a problem (each finding says what to fix)",
    ExitCode.ROLLED_BACK: "failover failed and was rolled back; the old primary is primary again",
    ExitCode.CONFLICT: "archive conflict: different content under the same name, or another cluster's archive",
    ExitCode.INTERRUPTED: "interrupted by a signal; work in progress was cleaned up",
    ExitCode.LOSS_POSSIBLE: "failover --primary-lost: the new primary is up, but WAL the old primary is known to have "
                            "written was not recovered (or the archive could not be read): commits may be lost",
    ExitCode.ENCRYPTION: "encryption key missing or wrong (the key ID needed is named), or an encrypted/plain "
                         "archive does not match storage.encryption",
    ExitCode.VALIDATION_ENVIRONMENT: "validation could not run: the throwaway PostgreSQL timed out, was killed (OOM), "
                                     "ran out of connections or the container runtime failed; the backup is not "
                                     "suspected and stays usable",
}


class DbopsError(Exception):
    """Base error: message, detail, hint, and the exit code it maps to."""

    exit_code: ExitCode = ExitCode.FAILED
    quiet: bool = False  # an outcome the caller expects (wal-fetch: not archived): exit code only, no message
    extra: dict | None = None  # more for the JSON error object (a failover's plan and report)

    def __init__(self, message: str, *, detail: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint

    def render(self) -> str:
        lines = [f"error: {self.message}"]
        if self.detail:
            lines.append(f"detail: {self.detail}")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {
            "error": type(self).__name__,
            "message": self.message,
            "detail": self.detail,
            "hint": self.hint,
            "exit_code": int(self.exit_code),
        }


class UsageError(DbopsError):
    exit_code = ExitCode.USAGE


class ConfigError(DbopsError):
    exit_code = ExitCode.CONFIG

    def __init__(self, message: str, *, problems: list[str] | None = None, **kw):
        self.problems = list(problems or [])
        if self.problems and "detail" not in kw:
            kw["detail"] = "\n  " + "\n  ".join(self.problems)
        super().__init__(message, **kw)


class StorageError(DbopsError):
    exit_code = ExitCode.STORAGE


class NotFoundError(DbopsError):
    exit_code = ExitCode.NOT_FOUND


class PostgresError(DbopsError):
    exit_code = ExitCode.POSTGRES
    sqlstate: str | None = None  # the server's error code, when the server sent one


class EngineError(PostgresError):
    """The container engine refused to signal a throwaway server's container, or did not answer:
    the server's state is unknown (a validation reports it as its environment, exit 17)."""


class QueryError(PostgresError):
    """A statement failed on an open connection (the driver's or the server's own words in detail)."""


class LockedError(DbopsError):
    exit_code = ExitCode.LOCKED


class ValidationError(DbopsError):
    exit_code = ExitCode.VALIDATION


class DamagedObjectError(ValidationError):
    """A stored object fails its authentication tag or framing: tampered or damaged, like a hash mismatch."""


class BackupDamagedError(ValidationError):
    """The backup being restored is damaged in storage: its manifest is unreadable, or a pack object
    is missing or fails its hash or authentication. A restore that picked the backup itself may
    start over from its fallback (dbops.ops.restore.run); the error keeps the original's words."""

    def __init__(self, backup_id: str, cause: ValidationError):
        super().__init__(cause.message, detail=cause.detail, hint=cause.hint)
        self.backup_id = backup_id

    @property
    def reason(self) -> str:
        """The message with its detail (which names the damaged object where the message does not)."""
        return self.message + (f" ({self.detail})" if self.detail else "")


class EncryptionError(DbopsError):
    """A key is missing or wrong, or an object's encryption does not match the configuration."""

    exit_code = ExitCode.ENCRYPTION


class UnknownOutcomeError(DbopsError):
    exit_code = ExitCode.UNKNOWN


class TargetError(DbopsError):
    exit_code = ExitCode.TARGET


class PreconditionError(DbopsError):
    exit_code = ExitCode.PRECONDITION


class RolledBackError(DbopsError):
    exit_code = ExitCode.ROLLED_BACK


class ValidationEnvironmentError(DbopsError):
    """Validation could not run for a reason outside the backup: never marks a backup failed."""

    exit_code = ExitCode.VALIDATION_ENVIRONMENT


class ConflictError(DbopsError):
    exit_code = ExitCode.CONFLICT


class LossPossibleError(DbopsError):
    exit_code = ExitCode.LOSS_POSSIBLE


class CommandError(DbopsError):
    """An external program failed. Carries its argv[0], status and stderr tail."""

    exit_code = ExitCode.FAILED

    def __init__(self, message: str, *, returncode: int | None = None, stderr: str = "", **kw):
        self.returncode = returncode
        self.stderr = stderr
        if stderr and "detail" not in kw:
            kw["detail"] = stderr.strip()[-2000:]
        super().__init__(message, **kw)


def exit_code_of(e: BaseException) -> int:
    """The documented exit code of an exception that ends a command (the CLI's and the WAL fast path's)."""
    if isinstance(e, DbopsError):
        return int(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.FAILED)
