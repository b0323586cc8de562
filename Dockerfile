# rebalancer-server: the gRPC expert-placement service on a CUDA-capable PyTorch base.
# The base already ships torch (CUDA 12.8 runtime, cuDNN 9), so installing the `server` extra only adds the
# small pure-Python dependencies; the same image runs on CPU when no GPU is given to the container.
# Build from the repository root:  docker build -t moe-rebalancer:0.1.0 .
FROM pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    REBALANCER_HOST=0.0.0.0 \
    REBALANCER_PORT=50051 \
    REBALANCER_METRICS_PORT=9464 \
    REBALANCER_STATE_DIR=/var/lib/rebalancer \
    REBALANCER_DEVICE=auto

# A fixed, unprivileged UID/GID so volume ownership is predictable (Kubernetes fsGroup uses the same).
RUN groupadd --gid 10001 rebalancer \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin rebalancer \
    && mkdir -p /var/lib/rebalancer \
    && chown 10001:10001 /var/lib/rebalancer

WORKDIR /opt/rebalancer
# Only what the wheel needs: metadata, both packages and the protos they are generated from.
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY client ./client
COPY wire ./wire
RUN pip install --no-cache-dir "./[server]"

USER 10001:10001
VOLUME ["/var/lib/rebalancer"]
EXPOSE 50051 9464

# The gRPC health service through the bundled CLI (no grpc_health_probe binary); the port follows the env.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "exec rebalancer health --target 127.0.0.1:${REBALANCER_PORT}"]

# The server turns SIGTERM into NOT_SERVING, drains in-flight RPCs and exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rebalancer-server"]
