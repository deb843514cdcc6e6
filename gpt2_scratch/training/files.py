"""Reading and replacing the files of our own folders without trusting what lies there: a link is never
followed, a FIFO or device is refused at once instead of blocking, a file is replaced by renaming a
complete temporary copy onto it, and only what we made ourselves is ever deleted."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path


class NotRegularFileError(OSError):
    """A path where a regular file belongs holds a folder, a FIFO, a device, a socket or a link."""


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of `path`, a regular file of at most `limit` bytes. A link is not followed and a FIFO
    is opened without blocking, so both are refused at once: FileNotFoundError when absent,
    NotRegularFileError (an OSError) for anything but a regular file, OSError when too large."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"{info.st_size:,} bytes, more than the {limit:,} expected", str(path))
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)
    except OSError as err:
        if err.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise NotRegularFileError(errno.ELOOP, "a symbolic link", str(path)) from err
        raise
    finally:
        os.close(fd)


def check_regular_or_absent(path: Path) -> None:
    """Raise NotRegularFileError unless `path` is absent or a regular file (never a link)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise NotRegularFileError(errno.EINVAL, "not a regular file", str(path))


def remove_ours(path: Path) -> None:
    """Delete `path`, a leftover of ours, without following it: a link or a file is unlinked (never
    what it points to), a folder removed with its contents."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def replace_text(path: Path, text: str) -> None:
    """`path` holding `text`, through a unique temporary file renamed onto it: a kill leaves the old
    file or the new one, never a cut one, and no other file is touched."""
    replace_with(path, lambda tmp: tmp.write_text(text))


def copy_replacing(src: Path, dst: Path) -> None:
    """`dst` replaced by a copy of `src`, atomically (as `replace_text`)."""
    replace_with(dst, lambda tmp: shutil.copyfile(src, tmp))


def replace_with(path: Path, write) -> None:
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".tmp_{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would make the records private to this user
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def umask() -> int:
    """This process's umask. Linux shows it in /proc; elsewhere it is read by setting it and back
    (Python has no getter), which a file created by another thread in between would see."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask(path: Path) -> None:
    """Give `path`, a file or a folder that we just wrote, and everything in it, the modes the umask
    gives any new file and folder (0644 and 0755 under the usual 022). safetensors 0.8 writes weights
    0600, and mkdtemp and mkstemp make 0700 and 0600: a serving account or a container with another uid
    could not read the model. Links are left alone (never followed)."""
    mask = umask()
    path = Path(path)
    for item in [path, *(path.rglob("*") if path.is_dir() and not path.is_symlink() else [])]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)
