"""Finding, signalling and reaping every process a child started.

A job's processes are found three ways, and the union is used:
- a cgroup v2 leaf per child, when the machine has a writable cgroup2 mount: membership is exact
  and survives ``setsid`` and double forks;
- the child's process group (the child leads its own group);
- descendants of the child, remembered across samples, because the supervisor is a child
  subreaper: an orphan whose parent exits is re-parented to the supervisor, not to init, and is
  still recognised as part of the job;
- orphans re-parented to the supervisor that carry the child's pid in their environment
  (``TREE_TAG_VARIABLE``), which finds a double-forked daemon that no sample saw.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import signal
from pathlib import Path
from typing import Callable

import psutil

from child.runtime import TREE_TAG_VARIABLE

logger = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36

# Cgroup directories of supervisors are named ``sandbox-runtime-<pid>-<n>``. The counter keeps two
# supervisors embedded in one process apart, so each gets its own ``child-<n>`` leaves.
_ROOT_PREFIX = "sandbox-runtime-"
_root_numbers = itertools.count(1)


def become_subreaper() -> bool:
    """Make this process the child subreaper for its descendants; return True on success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        logger.warning("could not become child subreaper: %s", os.strerror(ctypes.get_errno()))
        return False
    return True


class CgroupRoot:
    """A cgroup v2 directory owned by this supervisor; one leaf below it per child process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._counter = 0

    @classmethod
    def create(cls) -> "CgroupRoot | None":
        """Create this supervisor's cgroup directory, or return None where the machine does not allow it."""
        mount = _cgroup2_mount()
        if mount is None:
            return None
        own = _own_cgroup_path()
        if own is None:
            return None
        base = mount / own.lstrip("/")
        _remove_stale_roots(base)
        path = base / f"{_ROOT_PREFIX}{os.getpid()}-{next(_root_numbers)}"
        try:
            path.mkdir(exist_ok=True)
            probe = path / "probe"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        except OSError as exc:
            logger.info("cgroup v2 not usable at %s (%s): tracking process trees by group and descendants", base, exc)
            return None
        logger.info("tracking child process trees with cgroup v2 leaves under %s", path)
        return cls(path)

    def new_leaf(self) -> "CgroupLeaf | None":
        self._counter += 1
        leaf = self.path / f"child-{self._counter}"
        try:
            leaf.mkdir()
        except OSError as exc:
            logger.warning("could not create cgroup %s: %s", leaf, exc)
            return None
        return CgroupLeaf(leaf)

    def remove(self) -> None:
        for leaf in self.path.glob("child-*"):
            CgroupLeaf(leaf).remove()
        try:
            self.path.rmdir()
        except OSError:
            pass


class CgroupLeaf:
    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, pid: int) -> bool:
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError as exc:
            logger.warning("could not move pid %d into cgroup %s: %s", pid, self.path, exc)
            return False

    def pids(self) -> set[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return set()
        return {int(line) for line in text.split()}

    def kill(self) -> bool:
        try:
            (self.path / "cgroup.kill").write_text("1")
            return True
        except OSError:
            return False

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOENT,):
                logger.debug("cgroup %s not removed yet: %s", self.path, exc)


def _cgroup2_mount() -> Path | None:
    try:
        with open("/proc/self/mounts") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "cgroup2":
                    path = Path(parts[1])
                    if os.access(path, os.W_OK):
                        return path
    except OSError:
        return None
    return None


def _own_cgroup_path() -> str | None:
    try:
        with open("/proc/self/cgroup") as handle:
            for line in handle:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        return None
    return None


def _remove_stale_roots(base: Path) -> None:
    """Remove empty directories left by supervisors that died without cleaning up."""
    try:
        candidates = list(base.glob(f"{_ROOT_PREFIX}*"))
    except OSError:
        return
    for root in candidates:
        try:
            pid = int(root.name[len(_ROOT_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid == os.getpid() or psutil.pid_exists(pid):
            continue
        for leaf in root.glob("child-*"):
            try:
                leaf.rmdir()
            except OSError:
                pass
        try:
            root.rmdir()
        except OSError:
            pass


class ProcessTree:
    """The processes of one child and everything it started."""

    def __init__(self, root_pid: int, cgroup: CgroupLeaf | None) -> None:
        self.root_pid = root_pid
        self.cgroup = cgroup
        self._known: dict[int, float] = {}  # pid -> create_time, to never signal a reused pid

    def members(self, include_root: bool = True) -> list[psutil.Process]:
        """Return the live processes of the tree, remembering them for later samples."""
        found: dict[int, psutil.Process] = {}
        if self.cgroup is not None:
            # Membership of the leaf is exact: a process started in it stays unless a privileged process moves it.
            for pid in self.cgroup.pids():
                _add(found, pid)
        else:
            self._add_descendants_and_group(found)
        for pid, process in found.items():
            if pid not in self._known:
                create_time = _create_time(process)
                if create_time is not None:
                    self._known[pid] = create_time
        if not include_root:
            found.pop(self.root_pid, None)
        return [p for p in found.values() if _is_running(p)]

    def _add_descendants_and_group(self, found: dict[int, psutil.Process]) -> None:
        root = _process(self.root_pid)
        if root is not None:
            found.setdefault(root.pid, root)
            _add_children(found, root)
        for pid in self._group_members():
            _add(found, pid)
        self._add_tagged_orphans(found)
        for pid, create_time in list(self._known.items()):
            if pid in found:
                continue
            process = _process(pid)
            if process is None or _create_time(process) != create_time:
                del self._known[pid]
                continue
            found[pid] = process
            # A remembered process may have started children of its own after it was orphaned.
            _add_children(found, process)

    def _add_tagged_orphans(self, found: dict[int, psutil.Process]) -> None:
        """Add children of this supervisor that carry the child's tag, and their descendants."""
        tag = str(self.root_pid)
        try:
            candidates = psutil.Process().children()
        except psutil.Error:
            return
        for process in candidates:
            if process.pid in found:
                continue
            try:
                if process.environ().get(TREE_TAG_VARIABLE) != tag:
                    continue
            except psutil.Error:
                continue
            found[process.pid] = process
            _add_children(found, process)

    def _group_members(self) -> list[int]:
        try:
            pgid = os.getpgid(self.root_pid)
        except OSError:
            pgid = self.root_pid
        if pgid != self.root_pid:
            return []
        result = []
        for process in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(process.pid) == pgid:
                    result.append(process.pid)
            except OSError:
                continue
        return result

    def signal(self, signum: int, include_root: bool = True) -> int:
        """Send ``signum`` to every live member; return how many were signalled."""
        members = self.members(include_root=include_root)
        if signum == signal.SIGKILL and include_root and self.cgroup is not None:
            self.cgroup.kill()
        sent = 0
        for process in members:
            try:
                process.send_signal(signum)
                sent += 1
            except psutil.Error:
                pass
        if include_root:
            try:
                os.killpg(self.root_pid, signum)
            except OSError:
                pass
        return sent

    def reap(self) -> None:
        """Reap remembered members that were re-parented to this process and have exited."""
        for pid in list(self._known):
            if pid == self.root_pid:
                continue
            try:
                waited, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                waited = 0
                if not psutil.pid_exists(pid):
                    self._known.pop(pid, None)
            except OSError:
                continue
            if waited:
                self._known.pop(pid, None)

    def alive(self, include_root: bool = True) -> list[psutil.Process]:
        """Return the members still running, after reaping the ones that exited."""
        self.reap()
        running = [p for p in self.members(include_root=include_root) if _status(p) != psutil.STATUS_ZOMBIE]
        # A member may exit between the reap above and the listing, and then shows as a zombie or
        # not at all. Reap again, so an empty result also means that no zombie is left behind.
        self.reap()
        return running

    def rss_bytes(self) -> int:
        total = 0
        for process in self.members():
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for process in self.members():
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _add(found: dict[int, psutil.Process], pid: int) -> None:
    if pid not in found:
        process = _process(pid)
        if process is not None:
            found[pid] = process


def _add_children(found: dict[int, psutil.Process], process: psutil.Process) -> None:
    try:
        for child in process.children(recursive=True):
            found.setdefault(child.pid, child)
    except psutil.Error:
        pass


def _create_time(process: psutil.Process) -> float | None:
    try:
        return process.create_time()
    except psutil.Error:
        return None


def _status(process: psutil.Process) -> str | None:
    try:
        return process.status()
    except psutil.Error:
        return None


def _is_running(process: psutil.Process) -> bool:
    try:
        return process.is_running()
    except psutil.Error:
        return False


class OrphanReaper:
    """Reap exited orphans that were re-parented to this process because it is a subreaper.

    A double fork leaves a short-lived middle process that exits before any sample finds it. As a
    subreaper, this process inherits it and must wait for it, or it stays a zombie. A zombie is
    reaped only when two sweeps in a row find it, so a child that other code in this process is
    about to wait for (a ``subprocess.Popen`` of the application, say) is left to that code.
    """

    def __init__(self, exclude: Callable[[], set[int]]) -> None:
        self._exclude = exclude
        self._seen: set[int] = set()
        self.reaped = 0

    def sweep(self) -> int:
        """Reap the zombies seen by the previous sweep too; return how many were reaped."""
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return 0
        zombies = {process.pid for process in children if _status(process) == psutil.STATUS_ZOMBIE}
        zombies -= self._exclude()
        reaped = 0
        for pid in zombies & self._seen:
            try:
                waited, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if waited:
                reaped += 1
        self._seen = zombies
        self.reaped += reaped
        return reaped
