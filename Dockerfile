# fleetgate: the SSH gateway, and nothing else. It speaks SSH itself (asyncssh), so the
# image needs no sshd and no ssh client; the machines it wakes live elsewhere.
#
#   docker build -t fleetgate .
#   docker run -v /srv/fleetgate:/etc/fleetgate:ro -v fleetgate-state:/var/lib/fleetgate \
#              -p 2222:2222 -p 127.0.0.1:9180:9180 fleetgate
#
# /etc/fleetgate/fleetgate.toml is your config (see docs/config.example.toml); relative
# paths in it resolve inside /etc/fleetgate. Set gateway.state_dir = "/var/lib/fleetgate"
# (the only writable place but /tmp) and [metrics] listen = "0.0.0.0:9180" for the health check.
# Check a config with the same image: docker run ... fleetgate check -c /etc/fleetgate/fleetgate.toml
#
# Any Debian 12 base with python3 and python3-venv works too (--build-arg BASE=...): the tests
# build on a debootstrap root, since no image registry is reachable there.
ARG BASE=python:3.11-slim-bookworm
# hadolint ignore=DL3006
FROM ${BASE}

# Extra Debian packages, e.g. --build-arg APT_PACKAGES=openssh-server for the process
# backend (`fleetgate demo`). Empty by default: the gateway itself needs none.
ARG APT_PACKAGES=""
# hadolint ignore=DL3008
RUN if [ -n "$APT_PACKAGES" ]; then \
      apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $APT_PACKAGES \
      && rm -rf /var/lib/apt/lists/*; \
    fi

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/fleetgate/bin:$PATH

# Exactly what the tests ran with: requirements-runtime.lock, hash-checked, no resolver, into a
# virtualenv of its own (/opt/fleetgate, without pip); fleetgate itself with --no-deps.
# scripts/image-install.sh says how. The dependencies are a layer of their own, so a change
# to fleetgate's code does not fetch them again. Behind a TLS-intercepting proxy, give pip its
# CA bundle for the build only: --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt
# (RUN --mount needs BuildKit, Docker's default builder since 23.0, or podman/buildah).
COPY scripts/image-install.sh requirements.lock requirements-runtime.lock /src/
RUN --mount=type=secret,id=pip-ca /src/image-install.sh deps
COPY pyproject.toml /src/
COPY fleetgate /src/fleetgate
RUN --mount=type=secret,id=pip-ca /src/image-install.sh app && rm -rf /src

RUN groupadd --system --gid 10001 fleetgate \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/fleetgate --create-home \
      --shell /usr/sbin/nologin fleetgate \
    && mkdir -p /etc/fleetgate
USER 10001:10001
WORKDIR /var/lib/fleetgate
VOLUME ["/var/lib/fleetgate"]

EXPOSE 2222 9180

# /healthz of the metrics listener, with the Python already here (no curl in the image).
ENV FLEETGATE_HEALTHCHECK_URL=http://127.0.0.1:9180/healthz
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen(os.environ['FLEETGATE_HEALTHCHECK_URL'], timeout=4).status == 200 else 1)"]

# SIGTERM (docker stop) stops accepting and lets sessions finish for gateway.drain_timeout
# (default 60 s): stop with `docker stop -t 70` (compose: stop_grace_period) or they are
# cut after Docker's 10 s. SIGHUP (docker kill -s HUP) reloads the config. With the
# process backend, run with --init so that exited sshds are reaped.
STOPSIGNAL SIGTERM
ENTRYPOINT ["fleetgate"]
CMD ["serve", "-c", "/etc/fleetgate/fleetgate.toml"]
