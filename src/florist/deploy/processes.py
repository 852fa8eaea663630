"""Processes of one deployment: started with logs in files, every descendant recorded, stopped by pid.

    group = ProcessGroup(env, pid_file=workdir / "pids.json")
    link = group.start("superlink", ["flower-superlink", ...], workdir / "logs" / "superlink.log")
    group.wait_until(ready, timeout=60, what="the SuperLink to answer")   # raises if link exits
    ...
    stopped = group.stop()            # every pid recorded: SIGTERM, wait, SIGKILL what is left

Flower's SuperLink and SuperNodes start ``flower-superexec`` children (the SuperLink's in a session
of its own) that start one app process per task, and a child can outlive its parent. So the group
records every descendant of what it started, polling in a background thread because children
appear late, and every process carries ``FLORIST_DEPLOYMENT=<id>`` in its environment, which its
descendants inherit: ``stop`` also sweeps processes with that marker that the polling missed.
Nothing is ever found or stopped by its name.
"""

from __future__ import annotations

import codecs
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psutil

from florist.errors import FloristError
from florist.fsutil import write_text_atomic

MARKER = "FLORIST_DEPLOYMENT"
TAIL_LINES = 40


class DeploymentError(FloristError):
    """A deployment could not be started, or its federation failed."""


class ProcessExited(DeploymentError):
    """A process the deployment needs has exited; the message quotes the end of its log.

    Parameters
    ----------
    name : str
        The process's name in its group (e.g. ``supernode-001``).
    pid : int
        Its pid.
    returncode : int
        Its exit status (negative: killed by that signal).
    log : Path
        Its log file.
    """

    def __init__(self, name: str, pid: int, returncode: int, log: Path) -> None:
        self.name, self.pid, self.returncode, self.log = name, pid, returncode, log
        super().__init__(
            f"{name} (pid {pid}) exited with code {returncode}; last lines of {log}:\n{tail(log)}"
        )


@dataclass
class Managed:
    """A process the group started.

    Parameters
    ----------
    name : str
        Its name in the group, unique.
    process : psutil.Popen
        The running process.
    log : Path
        Where its stdout and stderr go.
    service : bool
        True for a process that must keep running (SuperLink, SuperNode): ``check`` raises when it exits.
    """

    name: str
    process: psutil.Popen
    log: Path
    service: bool

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def returncode(self) -> int | None:
        return self.process.poll()  # type: ignore[no-any-return]


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file, or a note that it is missing."""
    if not path.is_file():
        return f"({path} does not exist)"
    text = path.read_text(encoding="utf-8", errors="replace").rstrip("\n").splitlines()
    return "\n".join(text[-lines:]) if text else "(empty)"


def is_alive(proc: psutil.Process) -> bool:
    """True while ``proc`` (the same process, not a reuse of its pid) runs and is not a zombie."""
    try:
        return bool(proc.is_running()) and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pid_alive(pid: int) -> bool:
    """True while some non-zombie process has ``pid``."""
    try:
        return is_alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


class ProcessGroup:
    """Processes started for one deployment and all their descendants, stopped by pid.

    Parameters
    ----------
    env : Mapping[str, str]
        Environment of every process started (the group adds its ``FLORIST_DEPLOYMENT`` marker).
    pid_file : Path | None
        Rewritten with every recorded pid and command line whenever a new one is found, so a
        person can stop the processes by pid if this program is killed.
    cwd : Path | None
        Working directory of every process started (None: this process's).
    poll_seconds : float
        How often the background thread looks for new descendants.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        pid_file: Path | None = None,
        cwd: Path | None = None,
        poll_seconds: float = 0.5,
    ) -> None:
        self.marker = uuid.uuid4().hex
        self.env = {**env, MARKER: self.marker}
        self.pid_file = pid_file
        self.cwd = cwd
        self.poll_seconds = poll_seconds
        self.managed: dict[str, Managed] = {}
        self._procs: dict[int, psutil.Process] = {}
        self._commands: dict[int, str] = {}
        self._lock = threading.Lock()
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        """Every pid recorded so far: started processes and their descendants."""
        with self._lock:
            return sorted(self._procs)

    def start(self, name: str, argv: Sequence[str], log: Path, service: bool = True) -> Managed:
        """Start ``argv`` with stdout and stderr appended to ``log``; record its pid."""
        if name in self.managed:
            raise DeploymentError(f"a process named {name!r} was already started in this deployment")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            try:
                proc = psutil.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)  # fmt: skip
            except OSError as err:
                raise DeploymentError(f"cannot start {name}: {argv[0]!r}: {err}") from err
        managed = self.managed[name] = Managed(name, proc, log, service)
        self._record([proc], command=" ".join(argv))
        self._start_polling()
        return managed

    def run(self, name: str, argv: Sequence[str], log: Path, timeout: float) -> int:
        """Run a short command to its end (recorded and stopped like the others); its exit status."""
        managed = self.start(name, argv, log, service=False)
        return self.wait_exit(managed, timeout)

    def wait_exit(self, managed: Managed, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for ``managed`` to exit; its exit status."""
        try:
            return int(managed.process.wait(timeout))
        except psutil.TimeoutExpired as err:
            raise DeploymentError(
                f"{managed.name} (pid {managed.pid}) still runs after {timeout:.0f} s; "
                f"last lines of {managed.log}:\n{tail(managed.log)}"
            ) from err

    def check(self) -> None:
        """Raise ``ProcessExited`` for the first service (SuperLink or SuperNode) that has exited."""
        for m in self.managed.values():
            if m.service and (code := m.returncode()) is not None:
                raise ProcessExited(m.name, m.pid, code, m.log)

    def wait_until(self, done: Callable[[], bool], timeout: float, what: str, every: float = 0.25) -> None:
        """Poll ``done`` until it is true; raise when a service exits or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while not done():
            self.check()
            if time.monotonic() > deadline:
                raise DeploymentError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(every)

    def refresh(self) -> None:
        """Record every descendant of every recorded process that is still running."""
        with self._lock:
            parents = list(self._procs.values())
        found: list[psutil.Process] = []
        for parent in parents:
            try:
                found.extend(parent.children(recursive=True))
            except psutil.Error:
                continue  # exited since: its children were recorded by an earlier poll
        self._record(found)

    def sweep(self) -> None:
        """Record any process that carries this group's marker in its environment (missed children)."""
        with self._lock:
            known = set(self._procs)
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid not in known and proc.environ().get(MARKER) == self.marker:
                    found.append(proc)
            except psutil.Error:
                continue  # exited, or not ours to read
        self._record(found)

    def stop(self, timeout: float = 15.0) -> list[int]:
        """Stop every recorded process by pid (SIGTERM, wait ``timeout``, SIGKILL); all pids recorded."""
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join()
        for _ in range(3):  # a process that is being stopped may still start one last child
            self.refresh()
            self.sweep()
            with self._lock:
                alive = [p for p in self._procs.values() if is_alive(p)]
            if not alive:
                break
            _terminate(alive, timeout)
        return self.pids

    def _record(self, procs: Sequence[psutil.Process], command: str | None = None) -> None:
        """Remember ``procs`` and their command lines (re-read: a fresh child may not have exec'd yet)."""
        changed = False
        with self._lock:
            for proc in procs:
                if self._procs.get(proc.pid) != proc:
                    self._procs[proc.pid] = proc
                    changed = True
                cmd = command or _command_line(proc) or self._commands.get(proc.pid, "")
                changed |= self._commands.get(proc.pid) != cmd
                self._commands[proc.pid] = cmd
            if changed and self.pid_file is not None:
                _write_pid_file(self.pid_file, self._commands)

    def _start_polling(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="florist-deploy-pids", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._stop_polling.wait(self.poll_seconds):
            self.refresh()


class LogFollower:
    """Copies what a log file gained since the last call to a stream (to show ``flwr run`` live);
    with ``keep``, whole lines only, those ``keep`` accepts."""

    def __init__(self, path: Path, out: IO[str] | None, keep: Callable[[str], bool] | None = None) -> None:
        self.path, self.out, self.keep, self.offset = path, out, keep, 0
        self.partial = ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character cut in two

    def pump(self, final: bool = False) -> None:
        """Copy what is new; ``final``: also a last line without its newline."""
        if self.out is None or not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        text = self.decoder.decode(chunk, final)
        if self.keep is not None:
            lines = (self.partial + text).splitlines(keepends=True)
            self.partial = "" if final or not lines or lines[-1].endswith("\n") else lines.pop()
            text = "".join(line for line in lines if self.keep(line))
        if text:
            self.out.write(text)
            self.out.flush()


def _terminate(procs: list[psutil.Process], timeout: float) -> None:
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=timeout)


def _command_line(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _write_pid_file(path: Path, commands: Mapping[int, str]) -> None:
    write_text_atomic(
        path, json.dumps({str(pid): cmd for pid, cmd in sorted(commands.items())}, indent=1) + "\n"
    )
