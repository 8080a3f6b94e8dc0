# syntax=docker/dockerfile:1.7
# GPU trainer image: the DeepSpeed training tasks (stages 1 / 1.1 / 2 / 2.1), single- or multi-node.
#
#   docker build -f containers/trainer.Dockerfile -t <registry>/m2d2-trainer:<version> .
#
# CUDA choice. torch 2.11.0's default Linux wheel (the one on PyPI) is the CUDA 13.0 build: its metadata pins
# cuda-toolkit 13.0.2, nvidia-cudnn-cu13 9.19.0.56 and nvidia-nccl-cu13 2.28.9. pytorch's own index serves the same
# build as torch==2.11.0+cu130 at https://download.pytorch.org/whl/cu130, next to builds for older CUDA releases
# (e.g. cu128). We install the cu130 build from pytorch's index, so the CUDA variant is explicit, and
# base the image on the CUDA 13.0.2 + cuDNN 9 runtime. The CUDA libraries in the image and in the wheels are then
# the same 13.0 release, whichever copy the loader picks. torch loads its own copies through RPATH, so the base
# mainly provides the NVIDIA container-toolkit environment and a matching userland for other tools.
# GPU nodes need an NVIDIA driver >= 580 (CUDA 13.0's minimum). For nodes on driver 570.x, if pytorch's cu128
# index carries torch 2.11.0 (check https://download.pytorch.org/whl/cu128/torch/), build with
#   --build-arg TORCH_CUDA=cu128 --build-arg TORCH_CUDA_VERSION=12.8 and both FROM lines on
#   nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04.
# tests/test_containers.py checks that TORCH_CUDA and the base tag agree.
#
# DeepSpeed ops. Nothing is prebuilt and nothing compiles at run time:
#   - the project hands DeepSpeed a torch optimizer (torch.optim.AdamW(fused=True) on GPU, m2d2/train/engine.py),
#     so DeepSpeed's FusedAdam / CPUAdam ops are not needed (DS_BUILD_FUSED_ADAM etc. are not set);
#   - ZeRO-1/2 with NCCL and bf16 use torch kernels only, and the CPU-only shared-memory comm op is disabled by the
#     engine;
#   - DS_BUILD_OPS=0 builds the pure-Python wheel, and the runtime image has no nvcc. An op that tried to JIT
#     would fail at once instead of silently compiling for minutes on every pod start.
# Enabling an optimizer in the DeepSpeed config, or CPU/NVMe offload, would need ops: build them in a
# nvidia/cuda:13.0.2-cudnn-devel-ubuntu24.04 stage with DS_BUILD_<OP>=1 and TORCH_CUDA_ARCH_LIST set.

# Base images: tag for the reader, digest for the build (k8s/components/images is the table of pins; k8s/pin-images.sh
# resolves and writes the digests). uv has no digest yet: TODO(pin-images).
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# ---------------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04@sha256:14d94b039cb94bbd5da559f303b46bc4b0d5d6c24ab1a9d7b186e566ed3400dc AS build

ARG PYTHON_VERSION=3.11.14
ARG TORCH_CUDA=cu130
ARG TORCH_CUDA_VERSION=13.0
ARG TORCH_VERSION=2.11.0
ARG TORCHAUDIO_VERSION=2.11.0
ARG TORCHVISION_VERSION=0.26.0

# Python 3.11 (Ubuntu 24.04 ships only 3.12): a python-build-standalone interpreter that uv installs at build time.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    DS_BUILD_OPS=0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# 1. The CUDA torch stack from pytorch's index (exact versions).
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" \
        "torch==${TORCH_VERSION}+${TORCH_CUDA}" \
        "torchaudio==${TORCHAUDIO_VERSION}+${TORCH_CUDA}" \
        "torchvision==${TORCHVISION_VERSION}+${TORCH_CUDA}"

# 2. Every other dependency (core, [train] and [pipeline]) at the exact versions of constraints/cpu.txt, the
#    project's lock for CI. Its torch/CUDA lines describe the CPU machines, so they are replaced by the GPU stack
#    installed above.
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

# 3. The project itself (no dependency changes allowed at this point).
COPY m2d2 m2d2
COPY workflows workflows
RUN pip install --no-deps . \
    && pip check \
    && python -c "import torch; assert torch.version.cuda == '${TORCH_CUDA_VERSION}', torch.version.cuda" \
    && DS_ACCELERATOR=cpu python -c "import deepspeed, flytekit, mlflow, torchaudio, m2d2, workflows; print(deepspeed.__version__)"

# ---------------------------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04@sha256:14d94b039cb94bbd5da559f303b46bc4b0d5d6c24ab1a9d7b186e566ed3400dc AS trainer

# Fixed uid/gid 10001: pods set runAsUser/runAsGroup/fsGroup 10001 (k8s/base/tasks/podtemplates.yaml).
RUN groupadd --gid 10001 m2d2 \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/m2d2 --shell /usr/sbin/nologin m2d2

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/m2d2 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DS_ACCELERATOR=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Flyte's fast registration unpacks the task code into the working directory: it must be writable by the user.
WORKDIR /home/m2d2/app
RUN chown 10001:10001 /home/m2d2/app
USER 10001:10001
