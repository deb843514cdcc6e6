"""Reading and replacing the files of our own folders without trusting what lies there: a link is never
followed, a FIFO or device is refused at once instead of blocking, a file is replaced by renaming a
complete temporary copy onto it, and only what we made ourselves is ever deleted.

A write that the disk refuses (full, read-only, no permission) becomes one `DiskError` line here, in
`writing`, for every writer of the project: checkpoints, exports, logs, data shards, `--out` files."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gpt2_scratch.user_errors import UserError


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
    with writing(path.parent, path.name):
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


# ----------------------------------------------------------------------------------------------
# A disk that refuses a write: one line, and no partial file left


class DiskError(UserError):
    """A folder that is full or may not be written: one `error:` line (exit status 2). A long run stops on
    it with its newest intact checkpoint in place; it is not requeued (status 75), which would only fail again."""


FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# Writers outside Python say it in words: safetensors (Rust) "No space left on device (os error 28)".
RUST_ERRNO = {f"(os error {code})": code for code in (*FULL, *NOT_WRITABLE)}
# torch.save's zip writer loses the errno ("unexpected pos 6720 vs 6612"): a folder with less than this free
# when a write failed is taken as full.
NEARLY_FULL = 1 << 20


def mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def existing_parent(folder: Path) -> Path:
    """`folder`, or while it does not exist yet, its nearest existing parent."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def free_space(folder: Path) -> int:
    """Free bytes on the disk where `folder` is (or will be made)."""
    return shutil.disk_usage(existing_parent(folder)).free


def disk_refusal(err: BaseException, folder: Path) -> tuple[int, Path] | None:
    """How the disk refused a write into `folder` that failed with `err` (or with an error it was raised
    from or during): the errno (ENOSPC, EROFS, ...) and the folder it names (that of the file in the error,
    which may lie elsewhere, TMPDIR say, else `folder`); None when the failure is not the disk's."""
    seen, pending = set(), [err]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (*FULL, *NOT_WRITABLE):
            named = Path(error.filename) if isinstance(error.filename, (str, os.PathLike)) else None
            inside = named is None or named.absolute().is_relative_to(Path(folder).absolute())
            return error.errno, folder if inside else named.parent
        code = next((code for words, code in RUST_ERRNO.items() if words in str(error)), None)
        if code is not None:
            return code, folder
        pending += [error.__cause__, error.__context__]
    try:
        return (errno.ENOSPC, folder) if free_space(folder) < NEARLY_FULL else None
    except OSError:
        return None


def disk_error(code: int, folder: Path, what: str, needed: int | None = None) -> DiskError:
    """The one line for a write of `what` into `folder` that the disk refused with `code`."""
    if code in FULL:
        need = f", about {mib(needed)} needed" if needed else ""
        return DiskError(
            f"no space left in {folder} to write {what} ({mib(free_space(folder))} free{need}); free some space "
            "there (nothing was deleted to make room) or choose another folder"
        )
    return DiskError(
        f"{folder} is not writable ({os.strerror(code)}), so {what} cannot be written there; make it "
        "writable or choose another folder"
    )


@contextlib.contextmanager
def writing(folder: Path, what: str, partial: list[Path] | None = None, needed: int | None = None) -> Iterator[None]:
    """Write `what` into `folder`: a failure that is the disk's (full, read-only, no permission) removes the
    `partial` files and folders (the caller's temporary ones, listed once made) and becomes one `DiskError`;
    any other failure propagates unchanged."""
    try:
        yield
    except UserError:  # said already (a DiskError of an inner write, or the user's input)
        raise
    except Exception as err:
        refusal = disk_refusal(err, folder)
        if refusal is None:
            raise
        for path in partial or ():
            remove_ours(path)
        raise disk_error(*refusal, what, needed) from err


def check_room(folder: Path, needed: int, what: str) -> None:
    """Refuse, before anything is written, a write of `what` (about `needed` bytes) into `folder` that
    would not fit in its free space."""
    if free_space(folder) < needed:
        raise disk_error(errno.ENOSPC, folder, what, needed)


def check_writable(folder: Path, what: str) -> None:
    """Refuse, before any work, a destination folder that may not be written: a file made there (or in its
    nearest existing parent, where `folder` is still to be made) and removed at once."""
    probe_in = existing_parent(folder)
    with writing(probe_in, what):
        fd, name = tempfile.mkstemp(prefix=".tmp_write_check.", dir=probe_in)
        os.close(fd)
        os.unlink(name)
