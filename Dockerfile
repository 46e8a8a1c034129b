# gateway-agent container image: multi-stage, locked dependencies (uv.lock), non-root.
#   docker build -t gateway-agent .
#   podman build --format docker -t gateway-agent .     (podman/buildah: OCI format drops HEALTHCHECK)
#   docker run --read-only --tmpfs /tmp -v /srv/inbox:/inbox -v gateway-state:/state \
#       -p 127.0.0.1:9464:9464 gateway-agent             (/srv/inbox owned by uid 10001, or --user)
# Configuration: GATEWAY_* environment variables, or mount a file and pass --config.
# Both base images come from build arguments, so offline and mirrored builds can replace them
# (scripts/container-test builds both locally); pin them by digest from your registry with
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:... --build-arg UV_IMAGE=...@sha256:...

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---- build: exactly the locked runtime dependencies in /opt/gateway-agent, trimmed, compiled ---
FROM ${PYTHON_IMAGE} AS build
# binutils: strip, for the debug symbols the wheels' extension modules carry (build stage only).
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=0 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/gateway-agent
WORKDIR /src
# Dependencies first (a cached layer while only the code changes), then the project itself.
# Left out: protobuf and flatbuffers (declared by onnxruntime for its model-conversion tools):
# the agent never imports them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project \
        --no-install-package protobuf --no-install-package flatbuffers
COPY README.md ./
COPY gateway_agent ./gateway_agent
# Trim what never runs in the agent, then byte-compile once (hash-checked .pyc: valid whatever
# the file times, and never rewritten on the read-only root):
# - the libraries' own test suites and test data, C headers, Cython sources, type stubs and the
#   debug symbols of extension modules (the libraries they link in *.libs stay untouched);
# - botocore's API models of every AWS service except S3 and the ones its credential chain may
#   call (STS: assume-role, web identity; SSO, SSO-OIDC: SSO profiles; Signin: `aws login`);
#   boto3's resource models except S3's;
# - onnxruntime's C library for C/C++ programs (the Python module carries its own copy), and its
#   model-conversion, quantisation and transformer tools; the models Clean Pixel Data does not
#   use (PP-OCR recogniser and classifier, Tesseract's script detection);
# - numpy's Fortran and distutils build helpers; matplotlib's Tk, Qt-editor and web-backend parts,
#   toolbar icons, sample data and PostScript/PDF core fonts; fontTools except the glyph-name table matplotlib imports
#   (font subsetting serves PDF/PS output; the agent writes PNG and JPEG); Pillow's AVIF codec;
#   pydicom's code dictionaries for writing Structured Reports (pydicom.sr: the agent writes none).
# The check at the end (imports, a plot saved, the boto3 clients made, the text detector's model
# loaded) fails the build when a trimmed part turns out to be needed.
RUN uv sync --frozen --no-dev --no-editable \
        --no-install-package protobuf --no-install-package flatbuffers \
    && site=$(/opt/gateway-agent/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') \
    && find "$site" -depth -type d \( -name tests -o -path '*/pydicom/data/test_files' \) -exec rm -rf {} + \
    && find "$site" -depth -type d -name __pycache__ -exec rm -rf {} + \
    && find "$site" -type f \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.c' \
        -o -name '*.cpp' -o -name '*.h' -o -name '*.pyi' \) -delete \
    && find "$site" -path "$site/*.libs" -prune -o -type f -name '*.so' -exec strip --strip-unneeded {} + \
    && find "$site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts \
        ! -name sso ! -name sso-oidc ! -name signin -exec rm -rf {} + \
    && find "$site/boto3/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 -exec rm -rf {} + \
    && find "$site/fontTools" -mindepth 1 -maxdepth 1 ! -name __init__.py ! -name agl.py \
        ! -name misc -exec rm -rf {} + \
    && rm -rf "$site"/rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx \
        "$site"/rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx \
        /opt/gateway-agent/share/tessdata/osd.traineddata \
        "$site"/onnxruntime/capi/libonnxruntime.so.* "$site"/onnxruntime/datasets \
        "$site"/onnxruntime/quantization "$site"/onnxruntime/tools "$site"/onnxruntime/transformers \
        "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_core/lib \
        "$site"/matplotlib/backends/_tkagg.*.so "$site"/matplotlib/backends/qt_editor \
        "$site"/matplotlib/backends/web_backend "$site"/matplotlib/mpl-data/images \
        "$site"/matplotlib/mpl-data/sample_data "$site"/matplotlib/mpl-data/fonts/afm \
        "$site"/matplotlib/mpl-data/fonts/pdfcorefonts \
        "$site"/PIL/_avif.*.so "$site"/pillow.libs/libavif-*.so* "$site"/pydicom/sr \
    && /opt/gateway-agent/bin/python -m compileall -q -j 0 \
        --invalidation-mode unchecked-hash /opt/gateway-agent/lib \
    && /opt/gateway-agent/bin/gateway-agent --help > /dev/null \
    && PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/mpl /opt/gateway-agent/bin/python -c \
        'import boto3, matplotlib, onnxruntime, tesserocr, PIL.Image; matplotlib.use("Agg"); \
        import matplotlib.pyplot as plt; fig = plt.figure(); fig.gca().set_title(r"$\sigma$ (HU)"); \
        fig.savefig("/tmp/check.png"); fig.savefig("/tmp/check.jpg"); \
        s = boto3.session.Session(aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1"); \
        [s.client(name) for name in ("s3", "sts", "sso", "sso-oidc", "signin")]; \
        import sys; onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])' \
        "$site"/rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx \
    && rm -rf /tmp/mpl /tmp/check.png /tmp/check.jpg

# ---- runtime: the slim base, one layer with the virtual environment, and nothing else -------
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
