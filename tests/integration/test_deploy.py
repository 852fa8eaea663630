"""``florist deploy``: a SuperLink with TLS and SuperNode authentication, SuperNodes as processes.

The slow test starts a real deployment on free ports of 127.0.0.1 (3 SuperNodes, a tiny Llama,
2 rounds), checks that a node without the CA certificate and a node with an unregistered key are
refused by the same SuperLink, and that every recorded process is gone after ``stop``. The other
tests check the pieces (certificates, keys, run-config overrides, process errors, the parser)
without starting Flower.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from florist.cli import parse_args
from florist.deploy.certs import make_node_key, make_tls
from florist.deploy.launch import DEFAULT_APP, Deployment, DeploySettings
from florist.deploy.processes import MARKER, ProcessExited, ProcessGroup, pid_alive
from florist.deploy.runconfig import app_config, deploy_config, overrides_toml, run_overrides
from florist.errors import ConfigError
from tests.flower_helpers import save_tiny_model

pytestmark = pytest.mark.integration


def test_server_certificate_is_signed_by_the_ca_and_names_loopback(tmp_path: Path) -> None:
    tls = make_tls(tmp_path, hosts=["link.example.org", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert tls.server_key.stat().st_mode & 0o777 == 0o600


def test_node_key_is_openssh_ecdsa_p384(tmp_path: Path) -> None:
    key = make_node_key(tmp_path, "node-000")
    private = serialization.load_ssh_private_key(key.private.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == private.public_key().public_numbers()
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert key.private.stat().st_mode & 0o777 == 0o600


def test_run_overrides_send_only_what_differs_from_the_app(tmp_path: Path) -> None:
    cfg = deploy_config(
        None, 3, ["federation.rounds=2", "lora.ranks=[8, 4, 2]", f"run.dir={str(tmp_path)!r}"]
    )
    declared = app_config(DEFAULT_APP)
    sent = run_overrides(cfg, declared)
    assert sent["federation.num_clients"] == 3 and sent["federation.rounds"] == 2
    assert sent["lora.ranks"] == "[8, 4, 2]" and sent["run.dir"] == str(tmp_path)
    assert sent["run.name"].startswith("deploy-")
    assert "train.lr" not in sent  # equal to the app's value
    written = overrides_toml(sent)
    assert '"lora.ranks" = "[8, 4, 2]"\n' in written and '"federation.rounds" = 2\n' in written

    def without(key: str) -> dict[str, object]:
        return {k: v for k, v in declared.items() if k != key}

    assert "train.lr" not in run_overrides(cfg, without("train.lr"))  # undeclared, left at its default
    with pytest.raises(ConfigError, match="federation.rounds=2 cannot be passed.*does not declare the key"):
        run_overrides(cfg, without("federation.rounds"))


def test_nodes_must_agree_with_num_clients() -> None:
    with pytest.raises(ConfigError, match="federation.num_clients=4 contradicts --nodes 3"):
        deploy_config(None, 3, ["federation.num_clients=4"])


def test_parser_takes_overrides_after_options() -> None:
    args, _ = parse_args(["deploy", "c.toml", "--nodes", "3", "federation.rounds=2", "--port", "9"])
    assert (args.command, args.config, args.nodes, args.port) == ("deploy", "c.toml", 3, 9)
    assert args.overrides == ["federation.rounds=2"]


def test_a_service_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    group = ProcessGroup({"PATH": ""})
    code = "import sys; print('cannot bind port 1234'); sys.exit(3)"
    svc = group.start("superlink", [sys.executable, "-c", code], tmp_path / "superlink.log")
    group.wait_exit(svc, timeout=30)
    with pytest.raises(
        ProcessExited, match=r"superlink \(pid \d+\) exited with code 3(.|\n)*cannot bind port 1234"
    ):
        group.check()
    assert group.stop() == [svc.pid]


def test_stop_finds_children_that_outlive_their_parent(tmp_path: Path) -> None:
    """A grandchild in its own session, whose parent has exited, is still found (marker) and stopped."""
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True); time.sleep(0.1)"
    group = ProcessGroup({"PATH": ""}, poll_seconds=60)  # the poller never runs: only the sweep can find it
    parent = group.start("parent", [sys.executable, "-c", child], tmp_path / "parent.log", service=False)
    group.wait_exit(parent, timeout=30)
    pids = group.stop()
    assert len(pids) == 2 and parent.pid in pids
    assert not any(pid_alive(p) for p in pids)


def refusal_log(deployment: Deployment, name: str) -> str:
    return (deployment.logs / f"{name}.log").read_text(errors="replace")


def processes_with_marker(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_tls_deployment_runs_a_federation_and_refuses_untrusted_nodes(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="its clients are 4-bit (make install has bitsandbytes)")
    model = save_tiny_model(tmp_path / "tiny")
    common = [f"model.name={str(model)!r}", "federation.rounds=2", "federation.cpus_per_client=1",
              "lora.ranks=[8, 4, 2]", "train.steps=2", "train.batch_size=2", "data.skills_train=6",
              "data.skills_test=2", "eval.max_new_tokens=3", "eval.every=2", f"run.dir={str(tmp_path / 'runs')!r}",
              "run.progress=false", "lora.warm_start=false"]  # fmt: skip
    # the same nodes then run a second federation, FLoRIST with DP-SGD on every client (each message's
    # ClientApp process plans its steps and derives its noise from the round alone: epsilon still grows)
    dp_sgd = deploy_config(
        None, 3, [*common, "run.name='deploy-dp-sgd'", "privacy.mode='dp-sgd'", "privacy.noise_multiplier=1.0",
                  "privacy.delta=1e-2"],
    )  # fmt: skip
    cfg = deploy_config(
        None, 3,
        [*common, "run.name='deploy'",
         # 4-bit clients: a ClientApp process per message rebuilds the held global adapter by replaying
         # every global update, and its digest must still equal the server's
         "model.quantization='nf4'", "model.global_adapter_max_rank=6",
         # client-level DP through the deployment's server: the aggregator sees only the noised mean
         "privacy.mode='client'", "privacy.noise_multiplier=1.0", "privacy.delta=1e-2"],
    )  # fmt: skip
    deployment = Deployment(DeploySettings(workdir=tmp_path / "deployment", nodes=3))
    try:
        deployment.start()
        no_ca_key = deployment.new_key("no-ca")
        deployment.register(no_ca_key)  # registered: only the missing CA certificate refuses it
        no_ca = deployment.start_supernode(0, no_ca_key, trust_ca=False, name="no-ca", service=False)
        unregistered = deployment.start_supernode(
            1, deployment.new_key("unregistered"), name="unregistered", service=False
        )
        summary = deployment.run(cfg, timeout=900)
        no_ca_code = deployment.group.wait_exit(no_ca, timeout=120)
        unregistered_code = deployment.group.wait_exit(unregistered, timeout=120)
        private = deployment.run(dp_sgd, timeout=600)
    finally:
        pids = deployment.stop()

    assert no_ca_code != 0 and "CERTIFICATE_VERIFY_FAILED" in refusal_log(deployment, "no-ca")
    assert unregistered_code != 0 and "[code: 2004] Failed to activate SuperNode" in refusal_log(
        deployment, "unregistered"
    )

    assert summary["rounds"] == 2
    assert summary["sync"]["clients_match_server"]
    assert sorted(summary["sync"]["digests"]) == ["client-000", "client-001", "client-002"]
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    run = Path(summary["run_dir"])
    assert run == tmp_path / "runs" / "deploy"
    assert [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        0,
        1,
        2,
    ]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((run / "adapter" / "florist_base.json").read_text())["quantization"] == "nf4"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["aggregated"] for r in rows[1:]] == [["dp-noised-mean"]] * 2
    assert 0 < rows[1]["epsilon"] < rows[2]["epsilon"] == summary["privacy"]["epsilon"]

    assert private["rounds"] == 2 and private["sync"]["clients_match_server"]
    steps = [
        json.loads(line) for line in (Path(private["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    eps = {t: steps[t]["client_metrics"] for t in (1, 2)}
    assert sorted(eps[1]) == sorted(eps[2]) == ["client-000", "client-001", "client-002"]
    assert all(0 < eps[1][c]["epsilon"] < eps[2][c]["epsilon"] for c in eps[1])
    assert all(not {"train_loss", "tokens", "train_seconds"} & set(m) for m in eps[1].values())  # kept home

    commands = json.loads(deployment.group.pid_file.read_text())
    assert sorted(int(p) for p in commands) == pids
    started = [m.pid for m in deployment.group.managed.values()]
    assert set(started) < set(pids)  # descendants were recorded too
    assert any("flwr-serverapp" in c for c in commands.values())
    assert sum("flwr-clientapp" in c for c in commands.values()) >= 3
    assert [p for p in pids if pid_alive(p)] == []
    assert processes_with_marker(deployment.group.marker) == []
