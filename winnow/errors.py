"""Errors a user can act on.

Every failure caused by the user's input (recipe, data, model folder, run directory) is a
`WinnowError`: the CLI prints its one-line message and exits with status 2, leaving no
half-written output behind (outputs are written under temporary names and renamed).
"""

import errno


class WinnowError(Exception):
    """An error in the user's input: the message names the file, column or key and what was expected."""

    exit_code = 2


# The operating system's answers that are about the user's storage, not about winnow: one line, exit 2,
# never retried (a full disk or a read-only folder is not fixed by trying again).
_USER_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC",
        "EDQUOT",
        "EROFS",
        "EACCES",
        "EPERM",
        "ENOTDIR",
        "EISDIR",
        "EEXIST",
        "ENAMETOOLONG",
    )
    if hasattr(errno, name)
)


def is_user_os_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _USER_ERRNOS


def os_error_line(e: OSError) -> str:
    """``<path>: <reason>`` (both paths for a rename), e.g. ``runs/x: No space left on device``."""
    where = e.filename if e.filename is not None else "(unknown path)"
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    return f"{where}: {e.strerror or e}"
