"""One OS user per volume: PostgreSQL runs as the volume's user, so one node's OS
account reaches no other node's data, socket or processes, and a resurrected server
carries the identity on with the volume."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

from broker.cloud.base import CloudError
from broker.cloud.local.netns import FENCE_TIMEOUT, is_alive

# useradd and userdel lock /etc/passwd and fail at once when another holds it: ours
# wait for each other on this lock, and retry for a while against anyone else.
USERS_LOCK = Path("/run/pgha-broker-users.lock")
USERS_LOCK_WAIT = 30.0


def volume_user(volume_id: str) -> str:
    """The OS user PostgreSQL runs as on this volume, whichever server carries it."""
    return f"pgha-{volume_id}"


def _run_user_tool(args: list[str]) -> subprocess.CompletedProcess[str]:
    """useradd/userdel, one at a time among ours, retried while /etc/passwd is locked."""
    deadline = time.monotonic() + USERS_LOCK_WAIT
    fd = os.open(USERS_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        while True:
            result = subprocess.run(args, capture_output=True, text=True, check=False,
                                    timeout=60)
            if "cannot lock" not in result.stderr or time.monotonic() > deadline:
                return result
            time.sleep(0.05)
    finally:
        os.close(fd)  # releases the flock


def _pids_of(uid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat().st_uid == uid:
                    pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int, timeout: float = FENCE_TIMEOUT) -> None:
    """SIGKILL every process of `uid` (before its user goes: a later user given the
    same uid must not inherit them)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for pid in _pids_of(uid) if is_alive(pid)]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise CloudError(f"processes of uid {uid} still alive after SIGKILL")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def shared_memory_of(uid: int) -> list[int]:
    """The System V shared memory segments `uid` owns that no process has attached."""
    ids = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
            fields = line.split()
            # key shmid perms size cpid lpid nattch uid ...
            if len(fields) > 7 and int(fields[7]) == uid and fields[6] == "0":
                ids.append(int(fields[1]))
    return ids


def release_shared_memory(uid: int) -> None:
    """Remove `uid`'s unattached System V segments. A PostgreSQL killed with SIGKILL
    leaves its small interlock segment behind; only a restart in the same data
    directory would remove it. Once the volume's user is gone nothing would: the
    machine's segments (kernel.shmmni, 4096) run out and every initdb then fails."""
    for shmid in shared_memory_of(uid):
        subprocess.run(["ipcrm", "-m", str(shmid)], capture_output=True, check=False)


class VolumeUsers:
    """The OS users of one local cloud, marked by a comment made from its root."""

    def __init__(self, root: Path) -> None:
        self.comment = "pgha local cloud " + hashlib.sha256(str(root).encode()).hexdigest()[:16]

    def ensure(self, name: str) -> pwd.struct_passwd:
        with contextlib.suppress(KeyError):
            return self.own(name)
        result = _run_user_tool(["useradd", "--system", "--user-group", "--no-create-home",
                                 "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                                 "--comment", self.comment, name])
        if result.returncode != 0:
            with contextlib.suppress(KeyError):  # made meanwhile by another process
                return self.own(name)
            raise CloudError(f"could not create the OS user {name}: {result.stderr.strip()}")
        return self.own(name)

    def own(self, name: str) -> pwd.struct_passwd:
        """The user, if this cloud made it (KeyError when there is none)."""
        user = pwd.getpwnam(name)
        if user.pw_gecos != self.comment or user.pw_uid == 0:
            raise CloudError(f"the OS user {name} exists but was not made by this cloud")
        return user

    def own_directory(self, volume_id: str, path: Path) -> pwd.struct_passwd:
        """The volume's user (made if missing: a volume from before users per volume),
        and the volume its own, 0700. Its name is root's (volumes/ is), so the chown
        reaches the volume itself; below it, fwalk and lchown follow no link, and a
        file of root's or one with a second name (a hard link) keeps its owner."""
        user = self.ensure(volume_user(volume_id))
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
        if (st.st_uid, st.st_gid) != (user.pw_uid, user.pw_gid):
            for _top, subdirs, files, dir_fd in os.fwalk(path):
                for name in (*subdirs, *files):
                    entry = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                    if entry.st_uid == 0 or (entry.st_nlink > 1 and name in files):
                        continue
                    os.chown(name, user.pw_uid, user.pw_gid, dir_fd=dir_fd,
                             follow_symlinks=False)
            os.chown(path, user.pw_uid, user.pw_gid, follow_symlinks=False)
        path.chmod(0o700)
        return user

    def delete(self, name: str) -> None:
        try:
            user = self.own(name)
        except KeyError:
            return
        _kill_uid(user.pw_uid)
        release_shared_memory(user.pw_uid)
        result = _run_user_tool(["userdel", name])
        if result.returncode not in (0, 6):  # 6: no such user (gone meanwhile)
            raise CloudError(f"could not delete the OS user {name}: {result.stderr.strip()}")

    def names(self) -> list[str]:
        """The OS users this cloud made."""
        return sorted(p.pw_name for p in pwd.getpwall() if p.pw_gecos == self.comment)
