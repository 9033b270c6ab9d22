"""The exit codes of ckptctl, which scripts may rely on.

    0    ok
    1    the operation failed (INTERNAL, UNKNOWN, a local file error, ...)
    2    usage error: bad command line, or INVALID_ARGUMENT from the daemon
    3    not found (NOT_FOUND): no such container or pid
    4    wrong state (FAILED_PRECONDITION, ALREADY_EXISTS), e.g. not frozen, name taken
    5    not allowed (PERMISSION_DENIED, UNAUTHENTICATED)
    6    the daemon is down or unreachable (UNAVAILABLE)
    7    timed out (DEADLINE_EXCEEDED)
    8    not supported by this daemon or kernel (UNIMPLEMENTED)
    9    bad image file (image inspect)
    130  interrupted (Ctrl-C)
    141  stdout was closed early (e.g. piped into head)
"""

from __future__ import annotations

from .errors import ClientError

OK = 0
FAILED = 1
USAGE = 2
NOT_FOUND = 3
WRONG_STATE = 4
PERMISSION = 5
UNAVAILABLE = 6
DEADLINE = 7
UNIMPLEMENTED = 8
BAD_IMAGE = 9
INTERRUPTED = 130  # 128 + SIGINT, as shells report it
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a C tool killed by the pipe would give

# gRPC status code name -> exit code; any other code is FAILED.
_BY_STATUS = {
    "INVALID_ARGUMENT": USAGE,
    "OUT_OF_RANGE": USAGE,
    "NOT_FOUND": NOT_FOUND,
    "FAILED_PRECONDITION": WRONG_STATE,
    "ALREADY_EXISTS": WRONG_STATE,
    "ABORTED": WRONG_STATE,
    "PERMISSION_DENIED": PERMISSION,
    "UNAUTHENTICATED": PERMISSION,
    "UNAVAILABLE": UNAVAILABLE,
    "DEADLINE_EXCEEDED": DEADLINE,
    "UNIMPLEMENTED": UNIMPLEMENTED,
}

# (code, meaning) for --help; the module docstring above says the same.
TABLE = (
    (OK, "ok"),
    (FAILED, "the operation failed (INTERNAL, UNKNOWN, local file error, ...)"),
    (USAGE, "usage error, or INVALID_ARGUMENT from the daemon"),
    (NOT_FOUND, "no such container or pid (NOT_FOUND)"),
    (WRONG_STATE, "wrong state or name taken (FAILED_PRECONDITION, ALREADY_EXISTS)"),
    (PERMISSION, "not allowed (PERMISSION_DENIED, UNAUTHENTICATED)"),
    (UNAVAILABLE, "daemon down or unreachable (UNAVAILABLE)"),
    (DEADLINE, "timed out (DEADLINE_EXCEEDED)"),
    (UNIMPLEMENTED, "not supported by this daemon or kernel (UNIMPLEMENTED)"),
    (BAD_IMAGE, "bad image file (image inspect)"),
    (INTERRUPTED, "interrupted (Ctrl-C)"),
    (BROKEN_PIPE, "stdout closed early (e.g. piped into head)"),
)


def for_error(error: ClientError) -> int:
    return _BY_STATUS.get(error.code, FAILED)


def help_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {meaning}" for code, meaning in TABLE)
