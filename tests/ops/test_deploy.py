"""deploy/: the Dockerfile, the Kubernetes manifests and the systemd unit (issue 15, item 3).

The manifests are validated offline against the Kubernetes schemas (kubernetes-validate) and
cross-checked with each other and with the server's real configuration parser; the unit with
`systemd-analyze verify`. The image cannot be built here (no container engine): its recipe is
checked against the repository instead.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from orchestrator_server.config import Config
from tests.ops.tools import tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest release the manifests support (gRPC probes are GA since 1.27) and the newest known.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


def manifests() -> list[dict[str, Any]]:
    documents: list[dict[str, Any]] = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents += [document for document in yaml.safe_load_all(path.read_text()) if document]
    return documents


def find(kind: str, name: str) -> dict[str, Any]:
    return next(doc for doc in manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name)


def container() -> dict[str, Any]:
    pod = find("StatefulSet", "orchestrator")["spec"]["template"]["spec"]
    [only] = pod["containers"]
    return dict(only)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


# -- Kubernetes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(version: str) -> None:
    documents = manifests()
    assert {doc["kind"] for doc in documents} >= {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(find("StatefulSet", "orchestrator"))
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
    misspelt = copy.deepcopy(find("Service", "orchestrator"))
    misspelt["spec"]["selectr"] = misspelt["spec"].pop("selector")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSIONS[-1], strict=True)


def test_the_configmap_is_accepted_by_the_server_configuration(tmp_path: Path) -> None:
    settings = dict(find("ConfigMap", "orchestrator")["data"])
    keys = tmp_path / "keys"
    keys.write_text("admin:an-admin-key-of-some-length\n")
    config = Config.from_env({**settings, "API_KEYS_FILE": str(keys)})
    assert config.environment == "production" and config.api_keys_file == str(keys)
    assert (config.grpc_port, config.http_port) == (50051, 8080)


def test_the_statefulset_matches_the_server_it_runs() -> None:
    statefulset = find("StatefulSet", "orchestrator")
    settings = find("ConfigMap", "orchestrator")["data"]
    spec = statefulset["spec"]
    pod = spec["template"]["spec"]
    main = container()
    # SQLite has one writer: one replica, its file on the claimed volume.
    assert spec["replicas"] == 1
    [claim] = spec["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in main["volumeMounts"]}
    assert settings["DATABASE_PATH"].startswith(mounts[claim["metadata"]["name"]] + "/")
    # Keys from a Secret, at the path API_KEYS_FILE names.
    secret_volume = next(volume for volume in pod["volumes"] if "secret" in volume)
    assert settings["API_KEYS_FILE"].startswith(mounts[secret_volume["name"]] + "/")
    assert main["envFrom"] == [{"configMapRef": {"name": "orchestrator"}}]
    # Ports and probes: gRPC health on the gRPC port, /readyz on the HTTP port.
    ports = {port["name"]: port["containerPort"] for port in main["ports"]}
    assert ports == {"grpc": int(settings["GRPC_PORT"]), "http": int(settings["PORT"])}
    assert main["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    assert main["startupProbe"]["grpc"]["port"] == ports["grpc"]
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # The image's own entrypoint runs (no command override) as its non-root user.
    assert "command" not in main and "args" not in main
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(dict(dockerfile_instructions())["USER"].split(":")[0])


def test_the_grace_period_covers_the_drain() -> None:
    """preStop sleep, then SIGTERM: SHUTDOWN_DELAY, SHUTDOWN_GRACE, and the store flush after them
    (a graceful stop with 10k agents took 15.8 s in the benchmark: 10 s of margin at least)."""
    settings = find("ConfigMap", "orchestrator")["data"]
    main = container()
    command = main["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(settings["SHUTDOWN_DELAY"]) + float(settings["SHUTDOWN_GRACE"])
    grace = find("StatefulSet", "orchestrator")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pre_stop + drain + 10
    # The liveness probe (NOT_SERVING while draining) must not restart the pod during the drain.
    probe = main["livenessProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] > float(settings["SHUTDOWN_DELAY"]) + 5


def test_the_services_reach_the_pod() -> None:
    labels = find("StatefulSet", "orchestrator")["spec"]["template"]["metadata"]["labels"]
    port_names = {port["name"] for port in container()["ports"]}
    services = [doc for doc in manifests() if doc["kind"] == "Service"]
    headless = find("StatefulSet", "orchestrator")["spec"]["serviceName"]
    assert headless in {service["metadata"]["name"] for service in services}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in service["spec"]["ports"]} == port_names == {"grpc", "http"}
    budget = find("PodDisruptionBudget", "orchestrator")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


# -- Dockerfile -----------------------------------------------------------------------------------


def test_the_dockerfile_copies_what_exists_and_runs_the_real_entrypoint() -> None:
    instructions = dockerfile_instructions()
    copies = [shlex.split(argument) for name, argument in instructions if name == "COPY"]
    sources = [part for args in copies if not args[0].startswith("--from") for part in args[:-1]]
    assert sources, "no COPY of the sources"
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
    # Every package the distribution ships is copied, so `pip install .` finds it.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {
        name.removesuffix(".*") for name in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    assert packages <= set(sources)
    assert pyproject["project"]["readme"] in sources
    # The .dockerignore beside it lets exactly those through.
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert {line[1:] for line in ignored if line.startswith("!")} == set(sources)
    # Only the server extra: no dev or bench dependencies in the image.
    installs = [argument for name, argument in instructions if name == "RUN" and "pip install" in argument]
    assert len(installs) == 1 and "'.[server]'" in installs[0]
    # Non-root, and the entrypoint is the console script whose `serve` starts the server.
    user = dict(instructions)["USER"]
    assert user.split(":")[0] not in ("0", "root")
    cmd = json.loads(dict(instructions)["CMD"])
    assert cmd == ["orchestrator", "serve"]
    assert pyproject["project"]["scripts"]["orchestrator"] == "orchestrator_client.cli:main"
    script = Path(sys.prefix) / "bin" / "orchestrator"
    usage = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60).stdout
    assert re.search(r"^\s+serve\s+run the gRPC server", usage, re.M), usage
    # The health check asks /readyz on PORT; the exposed ports are the configured defaults.
    healthcheck = dict(instructions)["HEALTHCHECK"]
    assert "/readyz" in healthcheck and "PORT" in healthcheck
    assert dict(instructions)["EXPOSE"].split() == [str(Config.grpc_port), str(Config.http_port)]
    env = dict(instructions)["ENV"]
    assert re.search(r"DATABASE_PATH=/data/", env) and "VOLUME" in dict(instructions)


# -- systemd --------------------------------------------------------------------------------------


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` on the shipped unit, with ExecStart pointing at this checkout's
    installed console script (the unit's /opt/orchestrator/venv is where DEPLOYMENT.md installs it)."""
    analyze = tool("systemd-analyze")
    unit = (DEPLOY / "systemd" / "orchestrator.service").read_text()
    installed = "/opt/orchestrator/venv/bin/orchestrator"
    assert f"ExecStart={installed} serve\n" in unit
    local = tmp_path / "orchestrator.service"
    localised = unit.replace(installed, str(Path(sys.prefix) / "bin" / "orchestrator"))
    local.write_text(localised)
    verified = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    # A broken unit is reported (the check is not a no-op).
    local.write_text(localised.replace("Type=simple", "Type=sometimes"))
    broken = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert "Failed to parse service type" in broken.stderr, broken.stderr


def test_the_systemd_environment_file_is_accepted_by_the_server(tmp_path: Path) -> None:
    lines = (DEPLOY / "systemd" / "orchestrator.env").read_text().splitlines()
    settings = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    keys = tmp_path / "keys"
    keys.write_text("admin:an-admin-key-of-some-length\n")
    unit = (DEPLOY / "systemd" / "orchestrator.service").read_text()
    defaults = dict(re.findall(r"^Environment=(\w+)=(.*)$", unit, re.M))
    config = Config.from_env({**defaults, **settings, "API_KEYS_FILE": str(keys)})
    assert config.environment == "production"
    assert config.database_path.startswith("/var/lib/orchestrator/")  # the unit's StateDirectory
    assert "StateDirectory=orchestrator" in unit
    # Stopping waits longer than the drain takes.
    stop = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1))  # type: ignore[union-attr]
    assert stop >= config.shutdown_delay + config.shutdown_grace + 15
