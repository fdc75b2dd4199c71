# syntax=docker/dockerfile:1
#
# Streaming ASR gRPC server for NeMo cache-aware FastConformer RNNT models, on NVIDIA GPUs.
#
# Base: NVIDIA's NGC PyTorch image (CUDA, cuDNN, a GPU build of PyTorch, and TensorRT with its
# Python bindings). Its pip constraints (PIP_CONSTRAINT) keep that PyTorch build in place
# while the package and its GPU extras (cuda-python, tensorrt) are installed.
#
#   docker build -t nemo-stream .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 -v "$PWD/models:/models:ro" \
#       -e ASR_MODEL=/models/model.nemo -e ASR_ENGINE=tensorrt nemo-stream
#
# The engine is chosen by ASR_ENGINE (default auto: fast-cudagraph on the GPU, as asr-server's own
# default; or eager, fast, fast-cudagraph, cudagraph, onnx, tensorrt) or by flags after the
# image name (they override the environment: `docker run ... nemo-stream --engine tensorrt`).
# There is no silent fallback: a configured engine that fails to build or fails its start-up
# self-check stops the container, unless ASR_FALLBACK_ENGINE names one (reported in health and
# metrics). Exported ONNX graphs and TensorRT plans are cached in /var/cache/nemo-stream: mount
# a volume there to keep them across restarts. .nemo files are pickles: mount trusted ones only.
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    NEMO_STREAM_CACHE=/var/cache/nemo-stream

WORKDIR /opt/nemo-stream

COPY pyproject.toml README.md ./
COPY engines ./engines
COPY server ./server
COPY client ./client
COPY proto ./proto

# The import check fails the build when TensorRT's Python bindings are missing.
RUN pip install --no-cache-dir "./[gpu]" \
    && python -c "import tensorrt, grpc_health.v1, engines.factory, server.service.cli; print('TensorRT', tensorrt.__version__)"

RUN groupadd --gid 10001 asr \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin asr \
    && mkdir -p /var/cache/nemo-stream /models \
    && chown 10001:10001 /var/cache/nemo-stream

USER 10001:10001

# ASR_FRONTENDS: gRPC frontend processes around the engine; one process answers about 3,000
# chunks/s, so more than a few hundred streams need 4 (docs/SCALING.md). ASR_MAX_STREAMS,
# ASR_MAX_BATCH, ASR_FRONTENDS: auto sizes them to the machine (slots from the GPU's free memory,
# frontends from the container's cores; the CPU's fixed defaults without a GPU); a number overrides.
ENV ASR_MODEL=builtin:demo \
    ASR_ENGINE=auto \
    ASR_FALLBACK_ENGINE="" \
    ASR_DTYPE=auto \
    ASR_LOOKAHEAD_MS=160 \
    ASR_MAX_BATCH=auto \
    ASR_MAX_STREAMS=auto \
    ASR_FRONTENDS=auto \
    ASR_LOG_FORMAT=json

# gRPC (SpeechRecognition, grpc.health.v1, reflection) and HTTP (/metrics, /health, /ready).
# The metrics port binds loopback unless told: the image binds it on every interface, for
# Prometheus and HTTP health checks; publish it on a private network only (no authentication).
EXPOSE 50051 9400

# Model loading, graph capture or a first TensorRT build take minutes: a long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import sys, grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(service=''), timeout=5); sys.exit(0 if r.status == h.HealthCheckResponse.SERVING else 1)"]

ENTRYPOINT ["/bin/sh", "-c", "exec asr-server --model \"$ASR_MODEL\" --engine \"$ASR_ENGINE\" ${ASR_FALLBACK_ENGINE:+--fallback-engine \"$ASR_FALLBACK_ENGINE\"} --dtype \"$ASR_DTYPE\" --lookahead-ms \"$ASR_LOOKAHEAD_MS\" --max-batch \"$ASR_MAX_BATCH\" --max-streams \"$ASR_MAX_STREAMS\" --frontends \"$ASR_FRONTENDS\" --cache-dir /var/cache/nemo-stream --host 0.0.0.0 --port 50051 --metrics-host 0.0.0.0 --metrics-port 9400 --log-format \"$ASR_LOG_FORMAT\" \"$@\"", "asr-server"]
CMD []
