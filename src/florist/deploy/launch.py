"""``florist deploy CONFIG.toml --nodes N``: one federation on a TLS + SuperNode-auth Flower deployment.

    florist deploy demo --nodes 4 federation.rounds=2

Everything runs on 127.0.0.1 as separate processes, the way separate sites would run it
(docs/deployment.md shows the same steps by hand, across machines):

1. WORKDIR/certs: a new CA and the SuperLink's certificate (subjectAltName 127.0.0.1, localhost);
   WORKDIR/keys: one ECDSA key pair per SuperNode (OpenSSH format, as ``ssh-keygen -t ecdsa``);
   WORKDIR/flwr-home/config.toml (``FLWR_HOME``): the ``[superlink.florist-deploy]`` connection.
2. ``flower-superlink`` with TLS and ``--enable-supernode-auth`` on 127.0.0.1:PORT.
3. ``flwr supernode register keys/node-K.pub florist-deploy`` for every node.
4. N ``flower-supernode`` processes, node K with ``partition-id=K num-partitions=N``.
5. ``flwr run APP florist-deploy --stream --run-config WORKDIR/run-config-1.toml``, to its end
   (``link.LocalLink``, which the simulation behind ``florist run`` shares).
6. Every process stopped by pid (WORKDIR/pids.json lists them); the summary the ServerApp handed
   back (WORKDIR/outcome.json; RUN/summary.json holds the same) printed.

Logs of every process are in WORKDIR/logs. The command exits non-zero when the federation fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import tomli_w

from florist.config import FloristConfig
from florist.deploy.certs import NodeKey, TlsFiles, make_node_key, make_tls
from florist.deploy.link import HOST, LocalLink, healthy
from florist.deploy.processes import DeploymentError, Managed, tail
from florist.deploy.runconfig import DEFAULT_APP, run_dir
from florist.errors import ConfigError
from florist.fsutil import write_text_atomic

log = logging.getLogger(__name__)
CONNECTION = "florist-deploy"


@dataclass(frozen=True)
class DeploySettings:
    """Where and how a local deployment runs.

    Parameters
    ----------
    workdir : Path
        Certificates, keys, ``FLWR_HOME``, logs and ``pids.json``; created, and must be empty if it exists.
    nodes : int
        Number of SuperNodes (the run's ``federation.num_clients``).
    app : Path
        The Flower App directory passed to ``flwr run`` (florist's ``flower_app/``, shipped in the package).
    port : int | None
        The SuperLink's port on 127.0.0.1 (Fleet, Control and Runtime APIs); None: a free port.
    connection : str
        Name of the ``[superlink.NAME]`` connection written to ``FLWR_HOME/config.toml``.
    startup_timeout : float
        Seconds to wait for the SuperLink to answer and for each ``flwr supernode register``.
    """

    workdir: Path
    nodes: int
    app: Path = DEFAULT_APP
    port: int | None = None
    connection: str = CONNECTION
    startup_timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ConfigError(f"--nodes must be at least 1, got {self.nodes}")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}")
        if not (self.app / "pyproject.toml").is_file():
            raise ConfigError(
                f"Flower App {str(self.app)!r} has no pyproject.toml; pass florist config --app-dir"
            )


@dataclass(frozen=True)
class Layout:
    """The files of one deployment under its work directory (``LocalLink`` adds flwr-home, logs,
    pids.json, the run configs and the outcome file)."""

    root: Path

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"


class Deployment(LocalLink):
    """A SuperLink with TLS and SuperNode authentication and its SuperNodes, all on 127.0.0.1.

    Use it as a context manager: every process it started, and their descendants, are stopped by
    pid on exit. ``start`` brings up the SuperLink and ``settings.nodes`` registered SuperNodes;
    ``run`` runs one federation through them and returns its summary.

    Parameters
    ----------
    settings : DeploySettings
        Work directory, number of nodes, Flower App and port.
    echo : IO[str] | None
        Where to copy the ``flwr run --stream`` output while it runs (None: only its log file).
    """

    def __init__(self, settings: DeploySettings, echo: IO[str] | None = None) -> None:
        super().__init__(settings.workdir, settings.app, settings.connection, echo, port=settings.port)
        self.settings = settings
        self.layout = Layout(self.root)
        self.tls: TlsFiles | None = None
        self.nodes: list[Managed] = []

    def start(self) -> None:
        """Certificates and connection, the SuperLink, then every SuperNode with a registered key."""
        self.prepare()
        self.start_superlink()
        for k in range(self.settings.nodes):
            key = self.new_key(f"node-{k:03d}")
            self.register(key)
            self.nodes.append(self.start_supernode(k, key))

    def prepare(self) -> None:
        """Create the work directory, the CA and SuperLink certificate, and ``FLWR_HOME/config.toml``."""
        if self.root.exists() and any(self.root.iterdir()):
            raise ConfigError(f"deployment work directory {str(self.root)!r} exists and is not empty")
        for d in (self.home, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        self.tls = make_tls(self.layout.certs)
        write_text_atomic(
            self.home / "config.toml", connection_toml(self.settings.connection, self.address, self.tls)
        )

    def new_key(self, name: str) -> NodeKey:
        """A fresh SuperNode key pair ``keys/NAME`` and ``keys/NAME.pub``."""
        return make_node_key(self.layout.keys, name)

    def start_superlink(self) -> Managed:  # type: ignore[override]
        """Start ``flower-superlink`` and wait until its HTTPS health endpoint answers."""
        tls = self._tls()
        argv = [
            "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth",
        ]  # fmt: skip
        url = f"https://{self.address}/health"
        link = super().start_superlink(argv, lambda: healthy(url, tls.ca_cert), self.settings.startup_timeout)
        log.info("SuperLink on %s (pid %d), TLS and SuperNode authentication on", self.address, link.pid)
        return link

    def register(self, key: NodeKey) -> None:
        """``flwr supernode register KEY.pub CONNECTION``: the SuperLink will accept this key's node."""
        name = f"register-{key.private.name}"
        out = self.logs / f"{name}.log"
        argv = [self.exe("flwr"), "supernode", "register", str(key.public), self.settings.connection]
        code = self.group.run(name, argv, out, self.settings.startup_timeout)
        if code != 0:
            raise DeploymentError(f"registering {key.public} failed (exit {code}); {out}:\n{tail(out)}")
        log.info("registered %s", key.public.name)

    def start_supernode(
        self,
        index: int,
        key: NodeKey,
        *,
        trust_ca: bool = True,
        name: str | None = None,
        service: bool = True,
    ) -> Managed:
        """Start a ``flower-supernode`` for client ``index`` that authenticates with ``key``.

        Parameters
        ----------
        index : int
            Its ``partition-id`` (florist's client index).
        key : NodeKey
            Its authentication key pair (registered or not: an unregistered node is refused).
        trust_ca : bool
            Pass the deployment's CA as ``--root-certificates``; without it the node cannot verify
            the SuperLink's certificate and is refused.
        name : str | None
            Its name in the process group and log file (default ``supernode-INDEX``).
        service : bool
            True: the deployment fails if this node exits. False for a node expected to be refused.
        """
        name = name or f"supernode-{index:03d}"
        argv = [
            self.exe("flower-supernode"), "--superlink", self.address,
            "--auth-supernode-private-key", str(key.private),
            "--node-config", f"partition-id={index} num-partitions={self.settings.nodes}",
            "--host", HOST, "--port", str(self.free_port()),  # its own Runtime API, for its SuperExec
        ]  # fmt: skip
        if trust_ca:
            argv += ["--root-certificates", str(self._tls().ca_cert)]
        node = self.group.start(name, argv, self.logs / f"{name}.log", service=service)
        log.info("%s started (pid %d)", name, node.pid)
        return node

    def run(self, cfg: FloristConfig, timeout: float | None = None) -> dict[str, Any] | None:
        """Run ``cfg`` with ``flwr run`` through this deployment; the run's summary (None: see ``run_flwr``).

        ``cfg`` must name its run directory (absolute ``run.dir`` and a ``run.name``): the ServerApp
        writes it from a process of the SuperLink's. Raises the florist error that stopped the run,
        or ``DeploymentError`` when a SuperLink or SuperNode exits, when ``timeout`` seconds pass,
        or when the run ends without a result.
        """
        run = run_dir(cfg)
        if run.exists() and any(run.iterdir()):  # its summary.json would be taken for this run's
            raise ConfigError(f"run directory {str(run)!r} exists and is not empty; set run.name")
        if cfg.federation.num_clients != self.settings.nodes:
            raise ConfigError(
                f"federation.num_clients={cfg.federation.num_clients} but the deployment has "
                f"{self.settings.nodes} SuperNodes"
            )
        return self.run_flwr(cfg, timeout=timeout)

    def stop(self) -> list[int]:
        """Stop every process started and every descendant recorded, by pid; their pids."""
        pids = super().stop()
        if pids:
            log.info("stopped %d processes by pid: %s", len(pids), " ".join(map(str, pids)))
        return pids

    def _tls(self) -> TlsFiles:
        if self.tls is None:
            raise DeploymentError("no certificates yet: call prepare() (or start()) first")
        return self.tls


def connection_toml(name: str, address: str, tls: TlsFiles) -> str:
    """``FLWR_HOME/config.toml`` with one TLS connection ``[superlink.NAME]``, the default one."""
    connection = {"address": address, "root-certificates": str(tls.ca_cert.resolve())}
    return tomli_w.dumps({"superlink": {"default": name, name: connection}})
