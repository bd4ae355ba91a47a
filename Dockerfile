# syntax=docker/dockerfile:1
# One image for every pipeline component and for the `mrcnn` command line.
#
# The tag is the package version in trainer/version.py (see README, "Deploying to a cluster"):
#   VERSION=$(python -c 'from trainer.version import __version__; print(__version__)')
#   docker build --build-arg VERSION="$VERSION" -t "ghcr.io/mask-rcnn-pipeline/trainer:$VERSION" .
#
# The base is the GPU build of the TensorFlow that pyproject's `gpu` extra pins (tests/test_deploy.py
# keeps the two equal). The project is installed WITHOUT the `cpu`/`gpu` extras so that this
# image's own TensorFlow build stays the one that is imported.

# === Stage 1: wheels for the project and its pinned dependencies ===
FROM tensorflow/tensorflow:2.21.0-gpu AS wheels

ARG VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY components/ components/
COPY pipeline/ pipeline/

# The wheel's file name carries the version setuptools read from trainer/version.py: refusing a
# mismatching VERSION build arg keeps the OCI label and the tag from lying.
RUN python -m pip wheel --no-cache-dir --prefer-binary --wheel-dir /wheels . \
    && if [ ! -f "/wheels/mask_rcnn_pipeline-${VERSION}-py3-none-any.whl" ]; then \
         echo "VERSION build arg '${VERSION}' differs from trainer/version.py:" /wheels/mask_rcnn_pipeline-*.whl >&2; \
         exit 1; \
       fi

# === Stage 2: the runtime image ===
FROM tensorflow/tensorflow:2.21.0-gpu

ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="mask-rcnn-pipeline" \
      org.opencontainers.image.description="Mask R-CNN (TensorFlow 2 / Keras 3) trained by a Kubeflow pipeline with MLflow tracking" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/mask-rcnn-pipeline/mask-rcnn-pipeline" \
      org.opencontainers.image.base.name="docker.io/tensorflow/tensorflow:2.21.0-gpu"

# TF_ENABLE_ONEDNN_OPTS: TensorFlow's oneDNN kernels on every x86 CPU, whatever a process imports
# first (`import trainer` sets the same default; TensorFlow alone leaves them off on AVX2-only CPUs).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=1 \
    TF_ENABLE_ONEDNN_OPTS=1

# The wheels are bind-mounted, not copied, so no layer of this image keeps them.
RUN --mount=type=bind,from=wheels,source=/wheels,target=/wheels \
    python -m pip install --no-cache-dir --no-index --find-links=/wheels \
        "mask-rcnn-pipeline==${VERSION}" \
    && mrcnn --help > /dev/null

# A fixed numeric UID/GID (above the base's 1000-range users) so that Kubernetes can verify
# runAsNonRoot and the manifests can name the same IDs (k8s/: runAsUser 10001).
RUN groupadd --gid 10001 mrcnn \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin mrcnn

# The compiled pipeline (what `mrcnn pipeline submit --package` sends from the retraining
# CronJob) and the config presets, owned by root: the runtime user reads but cannot change them.
WORKDIR /app
COPY pipeline/mask_rcnn_pipeline.yaml /app/pipeline/mask_rcnn_pipeline.yaml
COPY configs/ /app/configs/

USER 10001:10001
ENTRYPOINT ["mrcnn"]
CMD ["--help"]
