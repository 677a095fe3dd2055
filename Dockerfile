# syntax=docker/dockerfile:1
# The kubeforge operator: `kubeforge operator` (kopf). The Helm chart runs it non-root, read-only root
# filesystem, with /tmp as an emptyDir. Build: docker build -t ghcr.io/kubeforge/operator:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir --disable-pip-version-check build==1.* \
 && python -m build --wheel --outdir /dist .

FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# no extras: the operator needs neither torch nor vllm; constraints.txt pins what it does need
RUN --mount=type=bind,from=wheel,source=/dist,target=/dist \
    --mount=type=bind,from=wheel,source=/src/constraints.txt,target=/constraints.txt \
    pip install -c /constraints.txt /dist/kubeforge-*.whl \
 && kubeforge version
RUN groupadd --gid 10001 kubeforge \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kubeforge
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["kubeforge"]
CMD ["operator"]
