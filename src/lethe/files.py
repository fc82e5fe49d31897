"""Files that are never half-written: write beside the target, then rename over it.

`os.replace` within one directory is atomic, so a reader (or a later run after a crash, a kill or
a full disk) sees the old file or the new one, never a torn one. Every file Lethe writes for
later use (checkpoints, token caches, metrics, tokenizers, exported models) goes through here.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path, fsync: bool = False):
    """A temporary path beside `path` for a writer that opens the file itself (torch.save); when
    the block ends without an error the file replaces `path`, else it is removed. `fsync` flushes
    it to the disk first (checkpoints: a power cut right after the rename must not leave an
    empty file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_write(path, mode: str = "wb", fsync: bool = False):
    """Open a temporary file beside `path` for writing (see atomic_path)."""
    with atomic_path(path, fsync) as tmp, open(tmp, mode) as f:
        yield f


def write_text(path, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def write_bytes(path, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_json(path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_directory(path, marker: str):
    """Yield an empty temporary directory beside `path`; what the block writes there appears in
    `path` when it ends without an error. A new `path` is the whole directory renamed into place;
    an existing one (another process finished first, or an export with --force) gets the files one
    by one, `marker` last, so a reader that waits for `marker` never sees half a directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        try:
            os.rename(tmp, path)  # fails if path exists (as a non-empty directory on Linux)
            return
        except OSError:
            pass
        path.mkdir(exist_ok=True)
        files = sorted((p for p in tmp.iterdir() if p.is_file()), key=lambda p: p.name == marker)
        for file in files:
            os.replace(file, path / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_directory(path) -> None:
    """Flush a directory's entries (the names renamed into it) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a, b) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the C
    library or the file system cannot (then nothing happened)."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_directory(new, path) -> None:
    """Put the complete directory `new` (written beside `path`) at `path`, dropping whatever was
    there (a directory or a file). A reader sees the old one or the new one, never a mix: the two
    are swapped atomically where the file system can (Linux), else the old one is renamed aside
    first and for that instant `path` does not exist (never a half-written directory)."""
    new, path = Path(new), Path(path)
    for root, _, files in os.walk(new):  # the contents reach the disk before the name does
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_directory(root)
    if not os.path.lexists(path):
        os.rename(new, path)
    elif _exchange(new, path):
        _remove(new)  # now the old one
    else:
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.rename(path, old / path.name)
        os.rename(new, path)
        shutil.rmtree(old, ignore_errors=True)
    fsync_directory(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
