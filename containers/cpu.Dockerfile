# syntax=docker/dockerfile:1.7
# Slim CPU image for the tasks that need no GPU: workspace/tracking setup, corpus ingestion, log-mel features,
# caption embedding, evaluation, registration.
#
#   docker build -f containers/cpu.Dockerfile -t <registry>/m2d2-cpu:<version> .
#
# torch comes from pytorch's CPU index (torch==2.11.0+cpu and friends: no CUDA libraries, about 1/10 of the size
# of the CUDA build). The rest uses the same exact pins as CI (constraints/cpu.txt), as in the trainer image.
# The image installs the core dependencies and the [train] and [pipeline] extras (the tasks track to MLflow and run
# under Flyte); DeepSpeed comes with [train] (pure-Python wheel, DS_BUILD_OPS=0), but these tasks never start a
# DeepSpeed engine.
#
# Base image: tag for the reader, digest for the build (k8s/components/images is the table of pins;
# k8s/pin-images.sh resolves and writes the digests).

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS build

ARG TORCH_VERSION=2.11.0
ARG TORCHAUDIO_VERSION=2.11.0
ARG TORCHVISION_VERSION=0.26.0

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

RUN pip install --index-url https://download.pytorch.org/whl/cpu \
        "torch==${TORCH_VERSION}+cpu" \
        "torchaudio==${TORCHAUDIO_VERSION}+cpu" \
        "torchvision==${TORCHVISION_VERSION}+cpu"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY constraints/cpu.txt constraints/cpu.txt
RUN { grep -vE '^(torch|torchaudio|torchvision|triton|nvidia-[A-Za-z0-9_.-]+|cuda-[A-Za-z0-9_.-]+)==' constraints/cpu.txt; \
      printf 'torch==%s\ntorchaudio==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHAUDIO_VERSION}" "${TORCHVISION_VERSION}"; \
    } > /tmp/constraints.txt \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; x = p['optional-dependencies']; \
            print('\n'.join(d for d in p['dependencies'] + x['train'] + x['pipeline'] if not d.startswith('m2d2')))" \
        > /tmp/requirements.txt \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt

COPY m2d2 m2d2
COPY workflows workflows
RUN pip install --no-deps . \
    && pip check \
    && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda" \
    && DS_ACCELERATOR=cpu python -c "import deepspeed, flytekit, mlflow, torchaudio, m2d2, workflows; print(deepspeed.__version__)"

# ---------------------------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS cpu

# Same fixed uid/gid 10001 as the trainer image (k8s PodTemplates run every task pod as 10001).
RUN groupadd --gid 10001 m2d2 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/m2d2 --shell /usr/sbin/nologin m2d2

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/m2d2 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DS_ACCELERATOR=cpu

WORKDIR /home/m2d2/app
RUN chown 10001:10001 /home/m2d2/app
USER 10001:10001
