"""A SuperLink florist starts on 127.0.0.1, and one ``flwr run`` after another through it: what a
TLS deployment (``launch.Deployment``) and florist's simulation (``florist.flower.simulation``) share.

    link = SomeLink(workdir, app, echo=sys.stdout)      # a subclass says how the SuperLink starts
    with link:
        link.start()
        summary = link.run_flwr(cfg)                    # as often as needed, one run at a time

Every process runs with ``FLWR_HOME=WORKDIR/flwr-home``, logs to ``WORKDIR/logs`` and is stopped by
pid on exit (``processes.ProcessGroup``). The ServerApp hands its outcome back through the file that
``FLORIST_OUTCOME`` names (``florist.flower.server_app``): the summary, or the florist error that
stopped the run, which ``run_flwr`` raises again here as the same kind of error (a bad config is
still one line and exit 2 on the CLI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from florist.config import FloristConfig
from florist.config.loader import flat_defaults, to_toml
from florist.deploy.processes import DeploymentError, LogFollower, Managed, ProcessGroup, tail
from florist.deploy.runconfig import DEFAULT_APP, app_config, overrides_toml, run_overrides
from florist.errors import ConfigError, FloristError, QuorumLost
from florist.fsutil import write_text_atomic

HOST = "127.0.0.1"
OUTCOME_ENV = "FLORIST_OUTCOME"
ERRORS: dict[str, type[FloristError]] = {"ConfigError": ConfigError, "QuorumLost": QuorumLost}


class LocalLink:
    """The processes around one SuperLink on 127.0.0.1 and the runs through it (see the module).

    Parameters
    ----------
    workdir : Path
        ``flwr-home``, ``logs``, ``pids.json``, the run config and the outcome file.
    app : Path
        The Flower App directory passed to ``flwr run``.
    connection : str
        Name of the ``[superlink.NAME]`` connection in ``FLWR_HOME/config.toml``.
    echo : IO[str] | None
        Where to copy the ``flwr run --stream`` output while it runs (None: only its log file).
    cwd : Path | None
        Working directory of every process (None: ``workdir``). The ServerApp resolves the config's
        relative paths against it.
    port : int | None
        The SuperLink's port (None: a free one).
    """

    def __init__(
        self,
        workdir: Path,
        app: Path,
        connection: str,
        echo: IO[str] | None = None,
        cwd: Path | None = None,
        port: int | None = None,
    ) -> None:
        self.root = workdir.resolve()
        self.app = app.resolve()
        self.connection = connection
        self.echo = echo
        self.bin_dir = Path(sys.executable).parent  # the venv's bin: flower-superexec is started by name
        self.group = ProcessGroup(self._env(), pid_file=self.root / "pids.json", cwd=cwd or self.root)
        self._ports: set[int] = set()
        self.port = port or self.free_port()
        self._ports.add(self.port)
        self._runs = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def outcome(self) -> Path:
        return self.root / "outcome.json"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def stop(self) -> list[int]:
        """Stop every process started and every descendant recorded, by pid; their pids."""
        return self.group.stop()

    def start_superlink(self, argv: Sequence[str], ready: Callable[[], bool], timeout: float) -> Managed:
        """Start ``flower-superlink ARGV --host HOST --port PORT`` and wait until ``ready()``."""
        full = [
            self.exe("flower-superlink"), *argv, "--host", HOST, "--port", str(self.port),
            "--disable-runtime-dependency-installation",  # offline: florist is already installed
        ]  # fmt: skip
        link = self.group.start("superlink", full, self.logs / "superlink.log")
        self.group.wait_until(ready, timeout, f"the SuperLink to answer on {self.address}")
        return link

    def run_flwr(
        self,
        cfg: FloristConfig,
        extra: Sequence[str] = (),
        timeout: float | None = None,
        keep: Callable[[str], bool] | None = None,
    ) -> dict[str, Any] | None:
        """``flwr run APP CONNECTION --stream --run-config FILE EXTRA`` for ``cfg`` to its end; the
        summary the ServerApp handed back (None: an app other than florist's ran to its end and handed
        back nothing). Raises the florist error that stopped the run, or ``DeploymentError`` when a
        service exits, ``timeout`` seconds pass, or florist's app ended without an outcome.
        ``keep``: which lines of the stream ``echo`` shows (None: all)."""
        self._runs += 1
        config_file = self.root / f"run-config-{self._runs}.toml"
        declared = app_config(self.app)
        if "config" in declared:  # an app that reads a florist TOML file (examples/own_flower_app)
            whole = self.root / f"florist-{self._runs}.toml"
            write_text_atomic(whole, to_toml(cfg))
            flat = flat_defaults(cfg)  # and the keys it declares, which Flower would set over the file's
            overrides: dict[str, Any] = {"config": str(whole), **{k: flat[k] for k in declared if k in flat}}
        else:  # florist's app declares every key: only what differs from its values
            overrides = run_overrides(cfg, declared)
        write_text_atomic(config_file, overrides_toml(overrides))
        self.outcome.unlink(missing_ok=True)
        argv = [
            self.exe("flwr"), "run", str(self.app), self.connection,
            "--stream", "--run-config", str(config_file), *extra,
        ]  # fmt: skip
        flwr = self.group.start(
            f"flwr-run-{self._runs}", argv, self.logs / f"flwr-run-{self._runs}.log", False
        )
        follower = LogFollower(flwr.log, self.echo, keep)
        deadline = None if timeout is None else time.monotonic() + timeout
        while flwr.returncode() is None:
            follower.pump()
            self.group.check()
            if deadline is not None and time.monotonic() > deadline:
                raise DeploymentError(f"the federation did not finish within {timeout:.0f} s; see {flwr.log}")
            time.sleep(0.5)
        follower.pump(final=True)
        return self._outcome(flwr)

    def _outcome(self, flwr: Managed) -> dict[str, Any] | None:
        if self.outcome.is_file():
            outcome = json.loads(self.outcome.read_text())
            if "error" in outcome:
                raise ERRORS.get(outcome["error"], FloristError)(outcome["message"])
            return outcome["summary"]  # type: ignore[no-any-return]
        code = flwr.returncode()
        if code == 0 and self.app != DEFAULT_APP.resolve():
            return None
        raise DeploymentError(
            f"the federation ended without a result (flwr run exited with code {code}); last lines of "
            f"{flwr.log}:\n{tail(flwr.log)}\n(SuperLink log: {self.logs / 'superlink.log'})"
        )

    def exe(self, name: str) -> str:
        found = shutil.which(name, path=str(self.bin_dir)) or shutil.which(name)
        if found is None:
            raise DeploymentError(f"{name!r} is neither in {self.bin_dir} nor on PATH; install flwr==1.42.0")
        return found

    def free_port(self) -> int:
        """A port on 127.0.0.1 that is free now and not yet handed to another process of this link."""
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.home)
        env[OUTCOME_ENV] = str(self.outcome)
        env["PATH"] = str(self.bin_dir) + os.pathsep + env.get("PATH", "")
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the files as they are written
        # Ray's own tip asks for this to silence its FutureWarning; CPU-only clients lose nothing by it.
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        for var in ("NO_PROXY", "no_proxy"):  # the processes talk to each other on loopback only
            env[var] = ",".join(filter(None, [env.get(var), HOST, "localhost"]))
        return env


FLOWER_CHATTER = re.compile(
    r"^(\x1b\[\d+m)?(DEBUG|INFO)\s*(\x1b\[0m)?\s*:"  # Flower's own INFO records ("INFO :      ...")
    r"|^(\x1b\[\d+m)?WARNING\s*(\x1b\[0m)?\s*:\s*Since flwr 1\.32"  # printed on every simulation
    r"|^\S*\(ClientAppActor pid=\d+\)\S*\s+(\x1b\[\d+m)?WARNING\s*(\x1b\[0m)?\s*:"
    r"\s*Manually terminating"  # each actor, at the end
    r"|^(Using SuperLink|Successfully started run|Successfully installed \S+ to)"  # flwr run's own
)


def not_flower_chatter(line: str) -> bool:
    """For ``run_flwr(keep=...)``: drop what Flower prints at INFO and ``flwr run``'s own progress,
    as ``florist run`` in one process did (``florist.console``); keep florist's lines and every warning."""
    return FLOWER_CHATTER.match(line) is None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def healthy(url: str, ca_cert: Path | None = None) -> bool:
    """True when ``url`` answers 200 (over TLS verified against ``ca_cert`` if given; no proxy)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca_cert is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_cert))))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:  # refused, not up yet, TLS failure (URLError and SSLError are OSErrors)
        return False
