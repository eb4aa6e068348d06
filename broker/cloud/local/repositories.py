"""Backup repositories of the local cloud: a directory per stanza on the host, outside
every volume (as object storage would be), so it outlives all of an instance's nodes.

pgBackRest writes as the PostgreSQL user of the node that runs it and makes its
directories 0750 and its files 0640. So one user owns a repository at a time, the
instance's primary (it archives; the broker hands the repository over before a
promotion), and its group is a peer's (the standby reads WAL from it): the top
directory is setgid, so everything made below keeps that group. No other node's user
is owner or group, and nothing is readable by others: another instance's node
reaches none of it."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import stat
from pathlib import Path

REPOSITORY_MODE = 0o2750  # setgid: whatever is made below inherits the reader group


class Repositories:
    """The repositories under `<cloud root>/backups`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, stanza: str) -> Path:
        return self.root / stanza

    def stanzas(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())

    def _ensure(self, stanza: str) -> Path:
        self.root.mkdir(mode=0o711, exist_ok=True)
        self.root.chmod(0o711)  # traversable, not listable
        path = self.path(stanza)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=0o700)
            os.chown(path, 0, 0, follow_symlinks=False)
        return path

    def hand_over(self, stanza: str, *, owner: tuple[int, int] | None = None,
                  reader_gid: int | None = None) -> None:
        """Make `owner` (uid, gid) the repository's writer and `reader_gid` its reading
        group; None keeps what is there (a new repository's group is its owner's)."""
        path = self._ensure(stanza)
        st = os.lstat(path)
        uid = owner[0] if owner else st.st_uid
        gid = reader_gid if reader_gid is not None else (
            owner[1] if owner and st.st_gid == 0 else st.st_gid)
        self._chown_tree(path, uid, gid)

    def hand_over_to(self, stanza: str, owner: tuple[int, int]) -> None:
        """`owner` writes from now on; the previous writer's group reads."""
        path = self._ensure(stanza)
        previous = os.lstat(path).st_uid
        reader_gid = None
        if previous not in (0, owner[0]):
            with contextlib.suppress(KeyError):
                reader_gid = pwd.getpwuid(previous).pw_gid
        self.hand_over(stanza, owner=owner, reader_gid=reader_gid)

    def delete(self, stanza: str) -> None:
        """rmtree never follows the links its writer may have planted below."""
        shutil.rmtree(self.path(stanza), ignore_errors=True)
        if self.path(stanza).exists():
            raise OSError(f"backup repository {stanza} could not be deleted")

    def owner_gid(self, stanza: str) -> int:
        """The writer's own group (root's when nobody writes it)."""
        owner = os.lstat(self.path(stanza)).st_uid
        try:
            return pwd.getpwuid(owner).pw_gid if owner else 0
        except KeyError:
            return 0

    def forget_user(self, uid: int, gid: int) -> None:
        """A node's user is deleted (its uid and gid may be given to another instance's
        node later): repositories it owned or read become root's alone until the next
        hand-over."""
        for stanza in self.stanzas():
            st = os.lstat(self.path(stanza))
            if st.st_uid == uid or st.st_gid == gid:
                self._chown_tree(self.path(stanza), 0 if st.st_uid == uid else st.st_uid,
                                 0 if st.st_gid == gid else st.st_gid)

    @staticmethod
    def _chown_tree(path: Path, uid: int, gid: int) -> None:
        """Never through a link; a file with a second name (a hard link its owner made
        to something else) is left alone."""
        for _top, subdirs, files, dir_fd in os.fwalk(path):
            for name in (*subdirs, *files):
                entry = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISREG(entry.st_mode) and entry.st_nlink > 1:
                    continue
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
                if stat.S_ISDIR(entry.st_mode):
                    _chmod_dir(name, dir_fd)
        os.chown(path, uid, gid, follow_symlinks=False)
        _chmod_dir(str(path), None)


def _chmod_dir(name: str, dir_fd: int | None) -> None:
    """The repository's mode on a directory, never on what a link names."""
    with contextlib.suppress(OSError):  # swapped for something else meanwhile: left alone
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
        try:
            os.fchmod(fd, REPOSITORY_MODE)
        finally:
            os.close(fd)
