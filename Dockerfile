# kipfix: one image for the agent (DaemonSet) and the operator (Deployment).
#
#   docker build -t kipfix .
#   buildah bud --pull=never --isolation chroot -t kipfix .   (tests/image/build-image.sh)
#
# The agent:    kipfix agent --kubernetes        (or --config FILE outside Kubernetes)
# The operator: kipfix operator                   (kopf; see deploy/helm/kipfix)
# Self-check:   kipfix dependency-check

# ---- Debian's kernel headers, merged into one tree --------------------------------
# BCC compiles the metering program at load time and needs kernel headers. Nodes
# rarely have them, so the image bundles Debian's generic ones (enough for a tc
# program): -common, then the arch package copied over it, in one folder that
# kipfix.agent.datapath.headers finds as its fallback. Built in a separate stage so that
# neither the packages nor their dependencies (gcc, kbuild) reach the final image.
# The arch tree's scripts/ and tools/ are links into linux-kbuild: BCC needs neither,
# so the dangling links are removed.
FROM debian:bookworm-slim AS headers
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    flavour="$(dpkg --print-architecture)"; \
    apt-get update; \
    apt-get install -y --no-install-recommends "linux-headers-${flavour}"; \
    arch_tree="$(ls -d /usr/src/linux-headers-*-"${flavour}" | sort -V | tail -n 1)"; \
    common_tree="${arch_tree%-${flavour}}-common"; \
    mkdir -p /usr/share/kipfix; \
    cp -a "${common_tree}" /usr/share/kipfix/kernel-headers; \
    cp -a "${arch_tree}/." /usr/share/kipfix/kernel-headers/; \
    find /usr/share/kipfix/kernel-headers -xtype l -delete; \
    test -f /usr/share/kipfix/kernel-headers/include/generated/autoconf.h; \
    test -f /usr/share/kipfix/kernel-headers/include/linux/kconfig.h; \
    rm -rf "${arch_tree}" "${common_tree}"

# ---- the kipfix wheel, with its C data-record encoder -------------------------------
# Built apart so that gcc and python3-dev stay out of the final image.
FROM debian:bookworm-slim AS wheel
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates; \
    rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=secret,id=ca-bundle set -eux; \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    python3 -m venv /build; \
    /build/bin/python -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); \
        print("\n".join(p["build-system"]["requires"]))' > /tmp/requirements.txt; \
    /build/bin/pip install -r /tmp/requirements.txt
COPY . /src
RUN /build/bin/pip wheel --no-deps --no-build-isolation -w /wheels /src

# ---- the image ---------------------------------------------------------------------
FROM debian:bookworm-slim

# python3-bpfcc: BCC's Python module and libbcc (not on PyPI); iproute2: `ip`/`tc`
# for dependency-check and for debugging in the pod.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc iproute2 ca-certificates; \
    rm -rf /var/lib/apt/lists/*

COPY --from=headers /usr/share/kipfix/kernel-headers /usr/share/kipfix/kernel-headers
# kipfix.agent.datapath.headers: host headers (/lib/modules/$(uname -r)/build) first, then this.
ENV KIPFIX_HEADERS_FALLBACK=/usr/share/kipfix/kernel-headers

# A venv that also sees Debian's bcc module (system site packages of /usr/bin/python3).
ENV VIRTUAL_ENV=/opt/kipfix \
    PATH=/opt/kipfix/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN /usr/bin/python3 -m venv --system-site-packages /opt/kipfix

# Dependencies first, from pyproject.toml alone: this layer is reused until they change.
# Behind a TLS-intercepting proxy, give pip the CA bundle that trusts it as a build
# secret (not stored in any layer):  --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt
COPY pyproject.toml /src/pyproject.toml
RUN --mount=type=secret,id=ca-bundle set -eux; \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi; \
    python -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); \
        print("\n".join(p["project"]["dependencies"]))' \
        > /tmp/requirements.txt; \
    pip install -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt

# The kipfix package itself (what the wheel holds is listed in .dockerignore).
COPY --from=wheel /wheels /wheels
RUN set -eux; \
    pip install --no-deps /wheels/kipfix-*.whl; \
    rm -rf /wheels /src; \
    python -c 'import bcc, pyroute2, kopf, kipfix.agent, kipfix.agent.export.ipfix._flowpack, kipfix.operator.handlers'; \
    kipfix --version

LABEL org.opencontainers.image.title="kipfix" \
      org.opencontainers.image.description="eBPF IPFIX flow exporter: agent and Kubernetes operator" \
      org.opencontainers.image.licenses="Apache-2.0"

# `kipfix agent ...`, `kipfix dependency-check`; the operator's pod sets its own command.
ENTRYPOINT ["kipfix"]
CMD ["agent", "--kubernetes"]
