# spotwatch as a sidecar container. Build from a local wheelhouse (no index needed):
#   pip wheel . -w wheelhouse && docker build -t spotwatch .
# (buildah/podman: add --format docker so the HEALTHCHECK is kept.)
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

COPY wheelhouse/ /tmp/wheelhouse/
RUN python3 -m venv /opt/spotwatch \
    && /opt/spotwatch/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheelhouse \
        spotwatch \
    && rm -rf /tmp/wheelhouse \
    && groupadd --gid 10001 spotwatch \
    && useradd --uid 10001 --gid 10001 --no-log-init --home-dir /var/lib/spotwatch \
        --create-home --shell /usr/sbin/nologin spotwatch

ENV PATH=/opt/spotwatch/bin:$PATH \
    STATE_DIRECTORY=/var/lib/spotwatch \
    PYTHONUNBUFFERED=1
USER spotwatch
WORKDIR /var/lib/spotwatch
VOLUME ["/var/lib/spotwatch"]
# Healthy while the daemon holds its state directory and reports at least every 30 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD ["spotwatch", "status", "--healthy", "-c", "/etc/spotwatch/config.yaml"]
# A container stop sends SIGTERM: the final flush runs, so give it e.g. --stop-timeout 115.
STOPSIGNAL SIGTERM
ENTRYPOINT ["spotwatch"]
CMD ["run", "-c", "/etc/spotwatch/config.yaml"]
