# Image of `resize-proxy serve`. docs/deploy.md describes how to build and run it.
#
# Both stages must use the same base image, because the virtual environment
# that the build stage makes links to that image's Python.
ARG PYTHON_IMAGE=python:3.12-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY proxy ./proxy
# Every dependency comes as a wheel, and pyvips-binary bundles libvips, so the
# slim image needs no compiler and no system libvips. pyvips itself is a
# source distribution, but a pure-Python one.
RUN pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
# A fixed numeric user, so that Kubernetes' runAsNonRoot can check it, and so
# that a mounted volume can be given to it with `chown 10001`.
RUN groupadd --system --gid 10001 proxy \
    && useradd --system --uid 10001 --gid proxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin proxy \
    && mkdir /data \
    && chown proxy:proxy /data
COPY --from=build /opt/venv /opt/venv
# MALLOC_ARENA_MAX=2 limits glibc's malloc arenas. In one measurement, a process
# resizing large JPEGs on 2 threads in repeated batches reached 416 MB peak RSS
# with the default number of arenas, and about 240 MB with 2.
# PROXY_STORAGE is /data because the local-folder default, ./images, does not
# exist in the image. Set s3://BUCKET, or mount a folder with original/ at /data.
# The preview page encodes every variant of a source per request, so the image
# turns it off; set PROXY_PREVIEW=1 on a private instance to use it.
# The CMD below reads PORT and WORKERS, and the HEALTHCHECK reads PORT.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_ARENA_MAX=2 \
    PROXY_STORAGE=/data \
    PROXY_PREVIEW=0 \
    PORT=8080 \
    WORKERS=1
USER 10001:10001
EXPOSE 8080
# The slim image has no curl. The opener skips any HTTP_PROXY setting, which
# would otherwise route this loopback request through a proxy. An HTTP error or
# a refused connection raises, so Python exits with status 1 (unhealthy).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.build_opener(urllib.request.ProxyHandler({})).open('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]
# exec makes resize-proxy process 1, so it receives SIGTERM from `docker stop`.
CMD ["sh", "-c", "exec resize-proxy serve --host 0.0.0.0 --port \"$PORT\" --workers \"$WORKERS\""]
