"""Atomic file writes: a crash never leaves a half-written file that looks whole."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import IPolicyError


def write_error(path: Path, error: OSError, kept: str = "") -> IPolicyError:
    """One line for a failed write (a full disk, a folder gone read-only): what failed, what is intact, the fix."""
    kept = kept or "what was written before is intact"
    return IPolicyError(f"Could not write '{path}': {error.strerror or error}; {kept}. Fix: free space on that disk "
                        "(or fix its permissions) and rerun, or choose another `out`.")


def user_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_file_mode() -> int:
    """The permissions the user's umask gives a new file (0o644 under the usual umask 022)."""
    return 0o666 & ~user_umask()


@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename. A failed write leaves
    ``path`` as it was and raises one ``IPolicyError`` line. The file gets the permissions of a normal new file
    (mkstemp's are 0600, which would hide results in a shared folder from colleagues)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, normal_file_mode())
        os.close(fd)
    except OSError as error:
        raise write_error(path, error) from error
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, error) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def json_lines(text: str) -> list[Any]:
    """The JSON values of JSON-lines ``text``, one per line. Lines end at "\\n" only: a JSON string may hold U+2028,
    U+2029 or U+0085 unescaped (ipolicy writes text with ensure_ascii=False), which ``str.splitlines`` would split.
    A bad line raises ``ValueError`` naming its number."""
    values = []
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                values.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"line {number}: {error}") from None
    return values
