# syntax=docker/dockerfile:1
# gateway-agent container image: multi-stage, locked dependencies (uv.lock), non-root.
#   docker build -t gateway-agent .
#   docker run -v /srv/inbox:/inbox -v gateway-state:/state -p 127.0.0.1:9464:9464 gateway-agent
# Configuration: GATEWAY_* environment variables, or mount a file and pass --config.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: resolve exactly the locked runtime dependencies into /opt/gateway-agent --------
FROM ${PYTHON_IMAGE} AS build
COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/gateway-agent
WORKDIR /src
# Dependencies first (cached layer while only the code changes), then the project itself.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project
COPY README.md ./
COPY gateway_agent ./gateway_agent
RUN uv sync --frozen --no-dev --no-editable

# ---- runtime: the slim base, the virtual environment and nothing else -----------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gateway-agent \
    && useradd --system --uid 10001 --gid gateway-agent --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gateway-agent \
    && mkdir -p /inbox /state \
    && chown gateway-agent:gateway-agent /inbox /state \
    && chmod 0700 /state
COPY --from=build /opt/gateway-agent /opt/gateway-agent
ENV PATH=/opt/gateway-agent/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    GATEWAY_INBOX=/inbox \
    GATEWAY_STATE_DIR=/state \
    GATEWAY_DESTINATION__FOLDER=/state/destination \
    GATEWAY_METRICS__HOST=0.0.0.0 \
    GATEWAY_METRICS__PORT=9464 \
    GATEWAY_LOG__FORMAT=json
USER 10001:10001
WORKDIR /state
VOLUME ["/inbox", "/state"]
EXPOSE 9464
# slim has no curl: ask /healthz with the Python that is already there.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u; p=os.environ.get('GATEWAY_METRICS__PORT','9464'); sys.exit(0 if u.urlopen(f'http://127.0.0.1:{p}/healthz', timeout=4).status == 200 else 1)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway-agent"]
CMD ["run"]
