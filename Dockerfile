# trainer: fine-tune SANA-Video 2B 480p from one YAML job spec.
#   docker build -t trainer .
#   docker run --gpus all -v /workspace:/workspace -e HF_TOKEN trainer spec.yaml
# CUDA 12.8 runtime: Ampere, Ada, Hopper and Blackwell; needs an NVIDIA driver >= 570.
# For older drivers build the cu126 flavour (driver >= 560):
#   docker build --build-arg CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.11.0
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="trainer" \
      org.opencontainers.image.description="Fine-tune SANA-Video 2B 480p from one declarative YAML job spec" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/trainer/trainer" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/workspace/.cache/huggingface \
    TORCH_HOME=/workspace/.cache/torch \
    TRAINER_WORKSPACE=/workspace \
    PATH=/opt/venv/bin:$PATH

# Python 3.12 and the FFmpeg libraries PyAV uses for video. Versions follow the pinned base
# image's Ubuntu release (24.04), which is what fixes them; apt pins would break on every point update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 python3.12-venv ca-certificates ffmpeg \
 && rm -rf /var/lib/apt/lists/* \
 && python3.12 -m venv /opt/venv

# Dependencies first (a layer that changes rarely), then the project.
WORKDIR /opt/trainer
# The same constraints.txt as the README's install and CI, except torch and triton: the image takes
# the CUDA build named by the build args instead of the CPU build the tests pin, and the Triton that
# build requires (the hand-written kernels run on it).
COPY pyproject.toml constraints.txt README.md ./
COPY job/__init__.py job/__init__.py
RUN grep -v -e '^torch==' -e '^triton==' constraints.txt > /tmp/constraints.txt \
 && pip install --extra-index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install -c /tmp/constraints.txt .
COPY job/ job/
COPY specs/ specs/
COPY entrypoint.sh /usr/local/bin/trainer-entrypoint
RUN pip install --no-deps . \
 && useradd --create-home --uid 1000 trainer \
 && mkdir -p /workspace && chown trainer:trainer /workspace

USER 1000:1000
VOLUME ["/workspace"]
WORKDIR /workspace
ENTRYPOINT ["/usr/local/bin/trainer-entrypoint"]
