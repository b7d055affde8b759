"""Every file slmkit writes goes through here: atomically, never through a planted symlink, with
the user's umask, and only into folders slmkit can show it owns.

- Atomic writes create a temporary file with an unpredictable name (`mkstemp`, O_EXCL) in the
  target's folder, fsync it, give it the mode any file the user creates would get, and rename it
  over the target. A rename replaces a symlink at the target name instead of following it, so a
  planted link can never redirect a write; a crash or a full disk leaves the previous file whole.
- Appends (metrics.jsonl) open with O_NOFOLLOW: a symlink in its place is refused.
- Owned folders carry a marker file naming what wrote them and which files it wrote. `--overwrite`
  removes only those files; a folder without a marker that is not empty is never touched.
- A run folder has a lock file holding the writer's PID and host; a second writer is refused, and
  a lock whose process is gone (a crash, `kill -9`) is taken over.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from slmkit.errors import UserError

MARKER = ".slmkit.json"
LOCK = ".slmkit.lock"
TMP_SUFFIX = ".slmkit-tmp"


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any thread starts.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _read_umask()
FILE_MODE = 0o666 & ~UMASK
DIR_MODE = 0o777 & ~UMASK


def write_error(path: Path | str, exc: BaseException) -> UserError:
    """The one-line error for a failed write: the OS's reason, and that the old file survived."""
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left" in text:
        reason = "no space left on the device"
    return UserError(f"cannot write {path}: {reason} (any previous version is untouched)")


def _is_write_failure(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return True
    # safetensors reports I/O errors (a full disk among them) as its own exception type.
    return type(exc).__name__ == "SafetensorError"


# ----------------------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path`; when the block succeeds it replaces `path`.

    The writer inside the block may reopen the temporary path by name (safetensors, matplotlib
    do): it was created by us, exclusively, so the name cannot be a planted link.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fchmod(f.fileno(), FILE_MODE)  # mkstemp makes 0600; others on the machine may read runs
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _is_write_failure(exc):
            raise write_error(path, exc) from None
        raise


def atomic_write(path: str | Path, write: Callable[[Path], Any], private_folder: bool = False) -> None:
    """`write(tmp_path)` fills a temporary file that then atomically replaces `path`.

    `private_folder` is for writers that make temporary files of their own beside the file they
    are given (safetensors' `save_file` does): they then work inside a folder of ours, so whatever
    a killed process leaves there carries our temporary suffix and is swept at the next start.
    """
    if not private_folder:
        with atomic_path(path) as tmp:
            write(tmp)
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent))
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        with atomic_path(folder / path.name) as tmp:
            write(tmp)
        os.replace(folder / path.name, path)
    except BaseException as exc:
        if _is_write_failure(exc):
            raise write_error(path, exc) from None
        raise
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line (a JSONL record); refuses to follow a symlink at `path`."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; slmkit does not write through links it did not make") from None
        raise write_error(path, exc) from None
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode("utf-8"))
    except OSError as exc:
        raise write_error(path, exc) from None
    finally:
        os.close(fd)


def remove_orphan_temps(folder: str | Path) -> list[Path]:
    """Delete temporary files an earlier, killed process left in `folder` (only our own suffix)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)) or p.is_symlink():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


# ----------------------------------------------------------------------------- reading


def read_utf8(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file, or standard input for '-'; anything else is a one-line error."""
    if str(path) == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        return decode_utf8(data, "standard input")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if not p.is_file():
        raise UserError(f"{what} {p} is not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {p}: {exc.strerror or exc}") from None
    return decode_utf8(data, str(p))


def decode_utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    p = Path(path)
    try:
        return json.loads(read_utf8(p, what))
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {p} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except RecursionError:
        raise UserError(f"{what} {p} is not valid JSON (nested too deeply)") from None


# ----------------------------------------------------------------------------- owned folders


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The ownership marker of `folder`, or None when slmkit did not create it."""
    p = Path(folder) / MARKER
    if p.is_symlink() or not p.is_file():
        return None
    try:
        marker = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(folder: str | Path, kind: str, files: Iterable[str] = (), replace: bool = False) -> None:
    """Record `files` as written by slmkit: added to those already listed, or (`replace`) instead of
    them, so that a name slmkit no longer has there stops being treated as its own."""
    folder = Path(folder)
    old = read_marker(folder) or {}
    keep = old.get("files", []) if old.get("kind") == kind and not replace else []
    names = sorted(set(keep) | set(files))
    atomic_write_json(folder / MARKER, {"kind": kind, "files": names, "tool": "slmkit"})


def record_files(folder: str | Path, kind: str, files: Iterable[str]) -> None:
    """Add `files` (names inside `folder`) to what the marker says slmkit wrote there."""
    write_marker(folder, kind, files)


def user_entries(folder: Path, owned: Iterable[str] = ()) -> list[str]:
    """Names in `folder` that slmkit did not write (its marker, lock and temp files excluded)."""
    mine = set(owned) | {MARKER, LOCK}
    return sorted(p.name for p in folder.iterdir() if p.name not in mine and not p.name.endswith(TMP_SUFFIX))


def claim_folder(
    folder: str | Path,
    kind: str,
    overwrite: bool,
    flag: str = "--out-dir",
    legacy: Callable[[Path], list[str] | None] | None = None,
) -> Path:
    """Make `folder` ours to write `kind` output into, or refuse with one line.

    - missing or empty: created and marked;
    - marked as ours with the same kind: with `overwrite`, the files slmkit wrote are removed (the
      user's own files stay); without it, the caller decides (resume, refuse);
    - anything else that is not empty: refused, whatever `overwrite` says.
    `legacy(folder)` may recognise output written before markers existed: it returns the names
    slmkit wrote there, or None.
    """
    p = Path(folder)
    if p.is_symlink() and not p.is_dir():
        raise UserError(f"{flag} {p} is a dangling symbolic link")
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} exists and is not a directory")
    if not p.exists():
        try:
            p.mkdir(parents=True, mode=0o777)
        except OSError as exc:
            raise UserError(f"cannot create {p}: {exc.strerror or exc}") from None
        write_marker(p, kind)
        return p
    marker = read_marker(p)
    if marker is None and legacy is not None:
        names = legacy(p)
        if names is not None:
            marker = {"kind": kind, "files": names}
            write_marker(p, kind, names)
    if marker is None:
        if user_entries(p):
            raise UserError(
                f"{flag} {p} is not empty and was not written by slmkit; choose an empty or new folder "
                "(slmkit never deletes files it did not write)"
            )
        write_marker(p, kind)
        return p
    if marker["kind"] != kind:
        raise UserError(f"{flag} {p} holds slmkit {marker['kind']} output, not {kind} output; choose another folder")
    if overwrite:
        remove_owned(p)
    return p


def remove_owned(folder: str | Path) -> list[str]:
    """Delete the files the marker says slmkit wrote (never a folder, never through a link)."""
    p = Path(folder)
    marker = read_marker(p)
    if marker is None:
        raise UserError(f"{p} was not written by slmkit; nothing is removed")
    removed = []
    for name in marker.get("files", []):
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
            continue  # a marker edited to point elsewhere removes nothing outside the folder
        target = p / name
        if target.is_symlink() or target.is_file():
            target.unlink()
            removed.append(name)
    remove_orphan_temps(p)
    # Names that are gone stop being ours: a file the user later puts there is theirs.
    left = [n for n in marker.get("files", []) if isinstance(n, str) and n not in removed
            and "/" not in n and ((p / n).exists() or (p / n).is_symlink())]
    write_marker(p, marker["kind"], left, replace=True)
    return removed


def check_output_folder(target: Path, kind: str, overwrite: bool, flag: str) -> None:
    """Refuse (one line) to write `kind` output into `target` unless it is new, empty, or ours."""
    if target.is_symlink() and not target.exists():
        raise UserError(f"{flag} {target} is a dangling symbolic link")
    if not target.exists():
        return
    if not target.is_dir():
        raise UserError(f"{flag} {target} exists and is not a directory")
    marker = read_marker(target)
    if marker is None:
        if user_entries(target):
            raise UserError(
                f"{flag} {target} is not empty and was not written by slmkit; choose an empty or new folder "
                "(slmkit never deletes files it did not write)"
            )
        return
    if marker["kind"] != kind:
        raise UserError(f"{flag} {target} holds slmkit {marker['kind']} output, not {kind} output; "
                        "choose another folder")
    if marker.get("files") and not overwrite:
        raise UserError(f"{flag} {target} already holds slmkit {kind} output; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_folder(
    target: str | Path, kind: str, overwrite: bool, flag: str = "--out-dir", last: str | None = None
) -> Iterator[Path]:
    """Build a whole output folder in a temporary sibling, then move it into `target`.

    Nothing appears in `target` until every file was written: a full disk or an error half way
    leaves `target` as it was. `target` must be new, empty, or slmkit output of the same kind with
    `overwrite` (only slmkit's files are replaced; the user's stay). When `target` exists, the new
    files replace the old ones one rename each, `last` (the file that marks the output complete,
    e.g. meta.json) after all others, and only then are old files the new output lacks removed.
    """
    target = Path(target)
    check_output_folder(target, kind, overwrite, flag)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TMP_SUFFIX, dir=parent))
    except OSError as exc:
        raise write_error(target, exc) from None
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        _install_stage(stage, target, kind, names, last)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        if _is_write_failure(exc):
            raise write_error(target, exc) from None
        raise


def install_staged(stage: str | Path, target: str | Path, kind: str, names: list[str], last: str | None = None) -> None:
    """Move the files `names` of a folder built beside `target` into it, as staged_folder does, for
    output built over several runs in a sibling of a fixed name (a resumable `prepare`). The caller's
    lock in `stage` (FolderLock) is held throughout and gone afterwards."""
    stage, target = Path(stage), Path(target)
    try:
        _install_stage(stage, target, kind, names, last)
    except OSError as exc:
        raise write_error(target, exc) from None
    lock = _read_lock(target / LOCK)
    if lock is not None and lock.get("pid") == os.getpid():  # the stage was renamed whole, our lock with it
        (target / LOCK).unlink(missing_ok=True)


def _install_stage(stage: Path, target: Path, kind: str, names: list[str], last: str | None) -> None:
    if any((stage / n).is_dir() for n in names):
        # Renaming a folder over an existing one fails half way; staged output is flat files only.
        raise ValueError(f"staged output for {target} holds a folder; slmkit writes flat output folders")
    os.chmod(stage, DIR_MODE)
    if not target.exists():
        write_marker(stage, kind, names)
        os.replace(stage, target)  # one rename: the folder appears complete or not at all
        return
    old = (read_marker(target) or {}).get("files", [])
    theirs = [n for n in names if n not in old and ((target / n).exists() or (target / n).is_symlink())]
    if theirs:
        raise UserError(f"{target} holds {theirs[0]}, which slmkit did not write; move it away and run again "
                        "(nothing was changed)")
    if last in names:
        (target / last).unlink(missing_ok=True)  # the old output no longer looks complete
    write_marker(target, kind, sorted(set(old) | set(names)))
    for name in sorted(names, key=lambda n: n == last):
        os.replace(stage / name, target / name)
    for name in set(old) - set(names):
        if isinstance(name, str) and "/" not in name and name not in ("", ".", ".."):
            (target / name).unlink(missing_ok=True)
    write_marker(target, kind, names, replace=True)
    shutil.rmtree(stage, ignore_errors=True)


# ----------------------------------------------------------------------------- run locks


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


class FolderLock:
    """An exclusive lock on a folder: `.slmkit.lock` created with O_EXCL, holding PID and host.

    A lock left by a process that no longer exists on this host is stale and taken over; a live
    holder, or one on another host (whose liveness cannot be checked), is a one-line refusal.
    """

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK
        self.held = False

    def acquire(self) -> FolderLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except FileExistsError:
                if not self._take_over_if_stale():
                    holder = self._holder() or {}
                    raise UserError(
                        f"{self.path.parent} is in use by another slmkit process (PID {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')} since {holder.get('since', '?')}); if that process is gone, "
                        f"delete {self.path}"
                    ) from None
                continue
            except OSError as exc:
                raise write_error(self.path, exc) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise UserError(f"cannot take the lock {self.path}; another process keeps taking it")

    def _holder(self) -> dict[str, Any] | None:
        return _read_lock(self.path)

    def _take_over_if_stale(self) -> bool:
        holder = self._holder()
        if holder is None:
            # Unreadable: a writer killed between create and write; stale if it is old enough.
            try:
                stale = time.time() - self.path.lstat().st_mtime > 5
            except FileNotFoundError:
                return True
        else:
            pid = holder.get("pid")
            stale = holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)
        if not stale:
            return False
        # Move the stale lock aside under a unique name, then check that what moved is the lock
        # judged stale: another process may have taken it over in between (then put theirs back).
        aside = self.path.with_name(f".{LOCK}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return True
        moved = _read_lock(aside)
        if moved == holder:
            aside.unlink(missing_ok=True)
            return True
        with contextlib.suppress(OSError):
            os.link(aside, self.path)  # fails only if yet another process made a lock meanwhile
        aside.unlink(missing_ok=True)
        return False

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is None or holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_if_only_marker(folder: str | Path, created_from: str | Path | None = None) -> bool:
    """Remove a folder slmkit created that holds nothing but its marker (a start that failed), and
    the empty parents it created with it, up to and including `created_from`."""
    p = Path(folder)
    if not p.is_dir() or read_marker(p) is None or user_entries(p) or (read_marker(p) or {}).get("files"):
        return False
    if any(n.name not in (MARKER, LOCK) for n in p.iterdir()):
        return False
    (p / MARKER).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        p.rmdir()
    if created_from is not None and not p.exists():
        top = Path(created_from).absolute()
        parent = p.absolute().parent
        while parent != top.parent and top in (parent, *parent.parents):
            try:
                parent.rmdir()  # only if empty: nothing of anyone's is lost
            except OSError:
                break
            parent = parent.parent
    return not p.exists()


def first_missing(folder: str | Path) -> Path | None:
    """The outermost folder on the way to `folder` that does not exist yet (None if it exists)."""
    p = Path(folder).absolute()
    missing = None
    while not p.exists():
        missing, p = p, p.parent
    return missing


def open_run_folder(
    folder: str | Path,
    kind: str,
    overwrite: bool,
    flag: str = "--out-dir",
    legacy: Callable[[Path], list[str] | None] | None = None,
) -> FolderLock:
    """Lock `folder` for one writer, then claim it (see `claim_folder`) and sweep up temp files a
    killed process left. The caller releases the returned lock when it is done writing."""
    p = Path(folder)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} exists and is not a directory")
    if p.is_dir() and read_marker(p) is None and (legacy is None or legacy(p) is None) and user_entries(p):
        claim_folder(p, kind, overwrite, flag, legacy)  # raises the one-line refusal, writes nothing
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {p}: {exc.strerror or exc}") from None
    lock = FolderLock(p).acquire()
    try:
        claim_folder(p, kind, overwrite, flag, legacy)  # under the lock: two writers never both delete
        remove_orphan_temps(p)
    except BaseException:
        lock.release()
        raise
    return lock
