# The `mlc` image: CLI and Temporal worker (`mlc worker`, the default command).
#
# Works in two worlds with one file:
#   * normal: `docker build .` on python:3.11-slim, pip installs from the package index;
#   * offline: a base image with python3 but no pip (e.g. the local mlc-python:3.11-bookworm)
#     plus a host-prepared wheelhouse:
#         deploy/make-wheelhouse.sh        # fills build/wheelhouse with the host's pip
#         docker build --build-arg BASE=mlc-python:3.11-bookworm .
#     When build/wheelhouse holds wheels, the build installs from it only (--no-index) and
#     takes pip itself from the pip wheel there when the base image lacks pip. Delete the
#     folder to go back to the index.
#
# Build args:
#   BASE     base image with python3 >= 3.11 (default python:3.11-slim)
#   EXTRAS   project extras to install, e.g. "embedded" (default: none)
#   MLC_UID  uid/gid of the unprivileged `mlc` user (default 10001)
#
# The worker drives Docker runtimes through /var/run/docker.sock: mount it and add the
# socket's group to the container (compose: `group_add: ["${DOCKER_GID}"]`).
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ARG EXTRAS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
COPY . /src
# A venv without pip first (Debian's python3 has no ensurepip), then pip into it: from the
# base image's pip when there is one, else from the wheelhouse's pip wheel (a wheel is a
# zip that python can run). Then the project, built from /src.
RUN set -eu; \
    wheels=/src/build/wheelhouse; \
    if ls "$wheels"/*.whl >/dev/null 2>&1; then \
        index_opts="--no-index --find-links $wheels"; \
    else \
        index_opts=""; \
    fi; \
    python3 -m venv --without-pip /opt/mlc; \
    if python3 -m pip --version >/dev/null 2>&1; then \
        python3 -m pip --python /opt/mlc/bin/python install --quiet $index_opts pip; \
    else \
        pip_wheel="$(ls "$wheels"/pip-*.whl 2>/dev/null | head -n 1)"; \
        if [ -z "$pip_wheel" ]; then \
            echo "ERROR: the base image has no pip and build/wheelhouse has no pip wheel;" \
                 "run deploy/make-wheelhouse.sh on the host first (see docs/team.md)" >&2; \
            exit 1; \
        fi; \
        /opt/mlc/bin/python "$pip_wheel/pip" install --quiet $index_opts pip; \
    fi; \
    /opt/mlc/bin/pip install --quiet $index_opts "/src${EXTRAS:+[$EXTRAS]}"; \
    /opt/mlc/bin/mlc --help >/dev/null 2>&1 || echo "note: 'mlc --help' failed (is the cli package in the image?)"; \
    install -m 0644 /src/deploy/worker/healthcheck.py /opt/mlc/healthcheck.py; \
    mkdir -p /opt/mlc/examples; \
    if [ -d /src/examples/models ]; then cp -r /src/examples/models /opt/mlc/examples/; fi

FROM ${BASE}
ARG MLC_UID=10001
# MLC_HOME: artifacts, runtime working dirs and caches (mount a volume here).
# MLC_TASK_QUEUE: the queue `mlc worker` serves, also what the HEALTHCHECK looks at.
ENV PATH=/opt/mlc/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLC_HOME=/var/lib/mlc \
    MLC_TASK_QUEUE=mlc
# nginx: runtime gateways (the models' stable endpoints) are nginx processes the worker
# starts; bubblewrap: `mlc worker --lifecycles` runs uploaded code in its sandbox (unless
# --no-sandbox, where the container is the sandbox). Debian's packages, from the archive the
# base image's apt uses (the local profile builds with network: host); skipped when present.
RUN set -eu; \
    if ! command -v nginx >/dev/null || ! command -v bwrap >/dev/null; then \
        apt-get update -qq; \
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            nginx-light bubblewrap >/dev/null; \
        rm -rf /var/lib/apt/lists/*; \
    fi; \
    nginx -v; bwrap --version; \
    groupadd --gid "$MLC_UID" mlc; \
    useradd --uid "$MLC_UID" --gid mlc --home-dir /home/mlc --create-home --shell /usr/sbin/nologin mlc; \
    mkdir -p /var/lib/mlc; \
    chown mlc:mlc /var/lib/mlc
COPY --from=build /opt/mlc /opt/mlc
# The example models for `mlc demo`: cli.examples looks for examples/models next to the
# installed packages, and trains the example in place, so its folder belongs to mlc.
RUN set -eu; \
    site="$(/opt/mlc/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    mv /opt/mlc/examples "$site/examples"; \
    chown -R mlc:mlc "$site/examples"
USER mlc
WORKDIR /home/mlc
# Healthy when Temporal answers and some worker polls $MLC_TASK_QUEUE.
HEALTHCHECK --interval=15s --timeout=10s --start-period=60s --retries=4 \
    CMD ["/opt/mlc/bin/python", "/opt/mlc/healthcheck.py"]
ENTRYPOINT ["mlc"]
CMD ["worker"]
