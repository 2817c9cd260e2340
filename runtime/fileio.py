"""Atomic file output: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import UserError


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on any error
    (or interruption) delete it, so an interrupted write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        tmp_path.chmod(0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_directory(path: str | os.PathLike) -> None:
    """Raise UserError now, before any long work, if a directory could not be written at `path`:
    a file of that name, a parent that is a file, or a folder that cannot be written (read-only,
    no permission). Probes by creating and removing an empty folder in the nearest existing
    ancestor; creates nothing that stays."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"cannot write the output directory {path}: a file of that name is in the way; remove it "
                        "or choose another output path")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a folder; choose another output path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".write-probe."))
    except OSError as error:
        raise UserError(f"cannot write into {ancestor} ({error.strerror}); choose a writable output path") from None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system or the file system does not offer it."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def backup_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def staging_prefix(target: Path) -> str:
    return f".{target.name}.tmp."


def replace_directory(complete: Path, target: Path) -> None:
    """Put the complete directory `complete` (a sibling of `target`) at `target`. An existing
    `target` is swapped with it atomically where the system can (Linux), so `target` is always
    the old or the new directory; then the old one is deleted. Elsewhere the old directory is
    first renamed to its backup name, which `recover_directory` restores after an interruption."""
    if target.exists():
        if _exchange(complete, target):
            shutil.rmtree(complete)
            return
        backup = backup_name(target)
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        complete.rename(target)
        shutil.rmtree(backup)
    else:
        complete.rename(target)


def recover_directory(target: str | os.PathLike) -> list[str]:
    """Clean up after an interrupted replace_directory of `target`: restore the backup if
    `target` is missing, delete a leftover backup and staging directories. What it did, as lines."""
    target = Path(target)
    done = []
    backup = backup_name(target)
    if backup.is_dir():
        if target.exists():
            shutil.rmtree(backup)
            done.append(f"removed the leftover backup {backup}")
        else:
            backup.rename(target)
            done.append(f"restored {target} from its backup (an earlier run was interrupted while replacing it)")
    if target.parent.is_dir():
        for leftover in target.parent.glob(staging_prefix(target) + "*"):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
                done.append(f"removed the unfinished {leftover}")
    return done
