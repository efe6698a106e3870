"""Local folders and files another user cannot plant or redirect (issue 13, item 11).

A folder dbops keeps state in (spool, host locks, scratch) must be a real folder, not a
symbolic link, owned by the running user (or root), and writable by nobody else; files in
it are opened with ``O_NOFOLLOW``. Anything else is refused with a PreconditionError that
names the folder, instead of writing through a path another local user prepared.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from dbops.errors import PreconditionError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def check_private_dir(path: str | os.PathLike, *, owners: tuple[int, ...] | None = None) -> None:
    """Refuse a folder that is a link, not a folder, owned by someone else, or group/other writable."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise PreconditionError(f"folder {p} does not exist") from None
    allowed = owners if owners is not None else (os.geteuid(), 0)
    hint = f"remove it, or create it as this user (uid {os.geteuid()}) with mode 0700 / 0755"
    if stat.S_ISLNK(st.st_mode):
        raise PreconditionError(f"refusing to use {p}: it is a symbolic link", detail=f"-> {os.readlink(p)}",
                                hint=hint)
    if not stat.S_ISDIR(st.st_mode):
        raise PreconditionError(f"refusing to use {p}: it is not a folder", hint=hint)
    if st.st_uid not in allowed:
        raise PreconditionError(f"refusing to use {p}: it belongs to uid {st.st_uid}, not to this user "
                                f"(uid {os.geteuid()})", detail="another local user may have created it first",
                                hint=hint)
    if st.st_mode & 0o022:
        raise PreconditionError(f"refusing to use {p}: it is writable by other users "
                                f"(mode {stat.S_IMODE(st.st_mode):04o})", hint=hint)


def private_dir(path: str | os.PathLike, *, create: bool = False, mode: int = 0o700,
                also_user: str | None = None) -> Path:
    """The folder, created (with its parents) when asked and missing, then checked. ``also_user``:
    an OS user that may own it as well (the PostgreSQL user, for folders shared with it)."""
    p = Path(path)
    if create:
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            pass
        except FileNotFoundError:
            p.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(p, mode)
            except FileExistsError:
                pass
    owners = (os.geteuid(), 0)
    if also_user:
        import pwd

        try:
            owners += (pwd.getpwnam(also_user).pw_uid,)
        except KeyError:
            pass
    check_private_dir(p, owners=owners)
    return p


def open_nofollow(path: str | os.PathLike, flags: int, mode: int = 0o600) -> int:
    """os.open that refuses a symbolic link as the last component (ELOOP becomes a clear error)."""
    try:
        return os.open(path, flags | NOFOLLOW, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PreconditionError(f"refusing to open {path}: it is a symbolic link",
                                    hint="another user may have planted it; remove it") from None
        raise
