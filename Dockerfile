# syntax=docker/dockerfile:1
# pathguard serving image: no torch. It answers from the guarded graph stored in the bundle (one onnxruntime run per
# batch: classifier, consistency copies, every component, the verdict), with the serving dependencies only
# ([project].dependencies: no extras). The default bundle artifacts/mnist-lenet5 is baked in with its guarded graph
# stored by the build stage (which has torch, as the builder does), verified at build time; non-root user.
#
#   docker build -t pathguard:0.1.0 .
#   (offline, with a local base and the CPU torch wheel on this machine: docs/deploy.md, `make image-test`)
#   docker run --rm -p 8080:8080 pathguard:0.1.0
#   docker run --rm -p 8080:8080 -e PATHGUARD_MODE=shadow -e PATHGUARD_REDIS_URL=redis://redis:6379/0 pathguard:0.1.0
#
# Every setting is a PATHGUARD_* environment variable (service/settings.py, docs/service.md). To serve another
# bundle, store its guarded graph first (`pathguard export BUNDLE --in-bundle`, where torch is installed), mount it
# and set PATHGUARD_BUNDLE to its folder.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Where pip finds CPU torch: the CPU wheel index. Where that index is unreachable, a folder or URL that holds the
# CPU wheel, e.g. --build-arg TORCH_SOURCE="--find-links http://127.0.0.1:8765/" (docs/deploy.md, offline builds).
ARG TORCH_SOURCE="--index-url https://download.pytorch.org/whl/cpu"
# Extra options for every pip install of the build (a mirror, a CA bundle, a timeout); none by default.
ARG PIP_OPTIONS=""

# ---------------------------------------------------------------------------------------------------------
# build: the builder's virtualenv (CPU torch, the build extra's dependencies); it stores the default bundle's
# guarded graph in the bundle. Nothing of it but that bundle reaches the image.
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_SOURCE
ARG PIP_OPTIONS

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# CPU torch first, from the CPU wheel index; the constraint keeps every later install on this exact build
# (a torch requirement that 2.13.0 satisfies then installs nothing, and no CUDA wheel is ever pulled).
RUN pip install $PIP_OPTIONS torch==2.13.0 $TORCH_SOURCE \
    && echo "torch==2.13.0" > /opt/constraints.txt \
    && python -c "import torch; assert torch.version.cuda is None, torch.version.cuda"
ENV PIP_CONSTRAINT=/opt/constraints.txt

WORKDIR /src
# Dependencies in their own layer: only pyproject.toml decides them ([project].dependencies and the build extra).
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['build']))" \
        > /tmp/requirements.txt \
    && pip install $PIP_OPTIONS -r /tmp/requirements.txt

COPY README.md LICENSE ./
COPY models ./models
COPY service ./service
RUN pip install $PIP_OPTIONS --no-deps . \
    && pip check \
    && python -c "import pathguard.models, pathguard.service.app"

# The default bundle with its guarded graph stored in it (guarded.onnx, guarded.json; a new sha256).
COPY artifacts/mnist-lenet5 /opt/pathguard/artifacts/mnist-lenet5
RUN ["pathguard", "export", "/opt/pathguard/artifacts/mnist-lenet5", "--in-bundle"]

# ---------------------------------------------------------------------------------------------------------
# serve: the serving virtualenv: [project].dependencies and the project, no torch
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS serve
ARG PIP_OPTIONS

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install $PIP_OPTIONS -r /tmp/requirements.txt

COPY README.md LICENSE ./
COPY models ./models
COPY service ./service
RUN pip install $PIP_OPTIONS --no-deps . \
    && pip check \
    && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the serving image'" \
    && python -c "import pathguard.service.app"

# ---------------------------------------------------------------------------------------------------------
# runtime: the serving virtualenv, the bundle, a health check and an unprivileged user
# ---------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="pathguard" \
      org.opencontainers.image.description="Online adversarial-input detection (Effective Path + NIC) for image classifiers" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 pathguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/pathguard --no-create-home \
        --shell /usr/sbin/nologin pathguard \
    && mkdir -p /var/lib/pathguard \
    && chown 10001:10001 /var/lib/pathguard

COPY --from=serve /opt/venv /opt/venv
# Read-only for the service user (owned by root): the bundle (with its stored guarded graph) and the health check.
COPY --from=build /opt/pathguard/artifacts/mnist-lenet5 /opt/pathguard/artifacts/mnist-lenet5
COPY deploy/docker/healthcheck.py /opt/pathguard/healthcheck.py

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/pathguard \
    PATHGUARD_BUNDLE=/opt/pathguard/artifacts/mnist-lenet5 \
    PATHGUARD_HOST=0.0.0.0 \
    PATHGUARD_PORT=8080 \
    PATHGUARD_GRPC_PORT=8081 \
    PATHGUARD_SPOOL_PATH=/var/lib/pathguard/flagged-spool.jsonl

WORKDIR /opt/pathguard
# Fail the build, not the first start, when the baked-in bundle does not match its manifest.
RUN ["pathguard", "verify", "/opt/pathguard/artifacts/mnist-lenet5"]

USER 10001:10001
# Flagged entries are spooled here while Redis is unreachable: keep it on a volume so none is lost on restart.
VOLUME ["/var/lib/pathguard"]
# 8080: HTTP (REST + Open Inference Protocol); 8081: the Open Inference Protocol over gRPC
EXPOSE 8080 8081

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "/opt/pathguard/healthcheck.py"]

# uvicorn handles SIGTERM: stops accepting, finishes in-flight requests, drains background work, exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pathguard"]
CMD ["serve"]
