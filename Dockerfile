# spotwatch as a sidecar container, built from this checkout on any host:
#   docker build -t spotwatch .
# The build stage runs on the same base as the runtime stage, so the wheels always match the
# image's Python, whatever Python the host has. Without Docker, see the README's buildah recipe
# (--format docker keeps the HEALTHCHECK). BASE_IMAGE: a Debian-based image whose python3 is 3.11
# or newer (Debian bookworm and newer, Ubuntu 24.04) with `python3 -m venv` and apt.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
# watchdog>=7.1 (its inotify overflow report) needs Python 3.11: an older base fails here, in one
# line, rather than in pip's resolver.
RUN python3 -c 'import sys; v = sys.version_info; sys.exit(v < (3, 11) and \
    "spotwatch needs Python 3.11 or newer; BASE_IMAGE has python3 %d.%d" % v[:2])'
# A venv without pip, filled by a throwaway pip: the runtime copy holds only spotwatch and its
# dependencies, never pip, setuptools, wheel or a wheelhouse.
RUN python3 -m venv /opt/build-tools \
    && python3 -m venv --without-pip /opt/spotwatch
COPY pyproject.toml README.md /src/
COPY src/ /src/src/
RUN /opt/build-tools/bin/pip --python /opt/spotwatch/bin/python --disable-pip-version-check \
        install --no-cache-dir /src

FROM ${BASE_IMAGE}
# tini reaps what hook commands leave behind (Python as PID 1 would leave them as zombies) and
# passes SIGTERM on to spotwatch; `docker run --init` does the same job. /run/spotwatch, the
# notice file's place, is spotwatch's: a named volume mounted there to share it with the trainer
# starts with that owner, so the daemon (not root) may write the notice into it.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 spotwatch \
    && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /var/lib/spotwatch \
        --create-home --shell /usr/sbin/nologin spotwatch \
    && install -d -o 10001 -g 10001 -m 0755 /run/spotwatch
COPY --from=build /opt/spotwatch /opt/spotwatch

# TINI_SUBREAPER: tini reaps orphans also when it is not PID 1 (under `docker run --init`, or in
# a pod with shareProcessNamespace).
ENV PATH=/opt/spotwatch/bin:$PATH \
    SPOTWATCH_CONFIG=/etc/spotwatch/config.yaml \
    STATE_DIRECTORY=/var/lib/spotwatch \
    PYTHONUNBUFFERED=1 \
    TINI_SUBREAPER=1
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
WORKDIR /var/lib/spotwatch
VOLUME ["/var/lib/spotwatch"]
# Healthy while the daemon holds its state directory and reports at least every 30 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["spotwatch", "status", "--healthy"]
# A container stop sends SIGTERM: the final flush runs, so give it e.g. --stop-timeout 115.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "spotwatch"]
CMD ["run"]
