# minedraft-serve: one image, three entry points (the command picks the role):
#   python -m services.drafter     (port 50061)
#   python -m services.verifier    (port 50062)
#   python -m services.router      (port 50051, the public Generation API)
# Settings come from flags or MINEDRAFT_* environment variables (README: Configuration); see docker-compose.yml.
#
# Build (CPU):   docker build -t minedraft-serve .
# Build (CUDA):  docker build -t minedraft-serve:cuda --build-arg TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cu128" .
# docker/build.sh wraps this (and can feed a local torch wheel to the build).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch is installed on its own (the big layer, cached across code changes). The default is the CPU wheel of the pinned
# version from PyTorch's CPU index; for a GPU image pass a CUDA index (or TORCH_PIP_ARGS="" for PyPI's default build).
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
# Added to every pip install, e.g. "--find-links http://127.0.0.1:8765/" (docker/build.sh serves a local wheel so).
ARG PIP_EXTRA_ARGS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv \
 && pip install ${PIP_EXTRA_ARGS} ${TORCH_PIP_ARGS} "${TORCH_SPEC}" \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /app

# The other dependencies, from pyproject.toml alone, so a code change does not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install ${PIP_EXTRA_ARGS} -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# The repository itself (layout kept: default model paths resolve to /app/models), installed editable. The gRPC stubs
# are compiled from protos/ now, while /app is still writable: the service user cannot write there later.
COPY . .
RUN pip install ${PIP_EXTRA_ARGS} --no-deps -e . \
 && python -c "import minedraft.v1, minedraft.healthcheck" \
 && python -m compileall -q minedraft services \
 && chmod -R a+rX,go-w /app \
 && useradd --uid 10001 --user-group --home-dir /home/minedraft --create-home --shell /usr/sbin/nologin minedraft

# In a container: listen on all interfaces, and do not pin to a core (use compose cpusets / --cpuset-cpus instead).
ENV MINEDRAFT_ROUTER_HOST=0.0.0.0 \
    MINEDRAFT_DRAFTER_HOST=0.0.0.0 \
    MINEDRAFT_VERIFIER_HOST=0.0.0.0 \
    MINEDRAFT_DRAFTER_CPU_CORE=-2 \
    MINEDRAFT_VERIFIER_CPU_CORE=-2

USER 10001:10001
EXPOSE 50051 8000 50061 50062

# gRPC health of whichever service this container runs (the port is detected; see minedraft/healthcheck.py).
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 CMD ["python", "-m", "minedraft.healthcheck"]

CMD ["python", "-m", "services.router"]
