"""Writing a file so that a reader never sees half of it: :func:`write_atomically`.

The weights file, a whole model's weights and its manifest are all written
this way: a temporary file beside the target, flushed to disk, renamed over it.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

from mumoe.typing import PathLike

__all__ = ["write_atomically"]


def write_atomically(path: PathLike, payload: bytes, what: str) -> None:
    """Write ``payload`` to ``path`` so that a reader never sees half of it.

    A temporary file in the same folder (a fresh name, the mode ``open`` would
    give a new file, an existing file's mode kept) is written, flushed to disk,
    and renamed over ``path``; on failure it is removed and the error names
    ``path``.

    Parameters
    ----------
    path : str or path-like
    payload : bytes
    what : str
        What the file is, for messages (``"the weights file"``).

    Raises
    ------
    IsADirectoryError
        If ``path`` is a folder.
    OSError
        If the file cannot be written; naming ``path``.

    Examples
    --------
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "note.json")
    >>> write_atomically(path, b"{}", "the note")
    >>> open(path).read()
    '{}'
    """
    target = os.fspath(path)
    if os.path.isdir(target):
        raise IsADirectoryError(errno.EISDIR, f"cannot write {what} over a folder", target)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)  # an existing file keeps its mode
    except OSError:
        mode = 0o666  # a new file: what the umask leaves of it, as open() gives
    folder = os.path.dirname(os.path.abspath(target))
    temporary = None
    try:
        temporary, handle = _create_beside(folder, mode)
        with os.fdopen(handle, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except OSError as error:
        _discard(temporary)
        # The temporary file is ours: the user's path is what failed.
        if error.errno is None:
            raise OSError(f"cannot write {what} {target!r}: {error}") from error
        raise OSError(error.errno, f"cannot write {what} ({error.strerror})", target) from error
    except BaseException:
        _discard(temporary)
        raise


def _create_beside(folder: str, mode: int) -> tuple[str, int]:
    # A new temporary file in the target's folder (mkstemp's would keep mode 0600).
    while True:
        name = os.path.join(folder, f".mumoe-{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, mode)
        except FileExistsError:
            continue
        if mode != 0o666:
            os.chmod(name, mode)  # an existing target's mode, not narrowed by the umask
        return name, fd


_BINARY = getattr(os, "O_BINARY", 0)


def _discard(temporary: str | None) -> None:
    if temporary is not None and os.path.exists(temporary):
        os.unlink(temporary)
