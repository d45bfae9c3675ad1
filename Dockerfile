# rl-mtl: reproducible training runs.
#   docker build -t rl-mtl --build-arg GIT_COMMIT=$(git rev-parse HEAD) .
#   docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/runs:/runs" rl-mtl \
#       python -m rl_mtl.train --method nashmtl --seed 3
# Python 3.11 matches constraints.txt; PyPI's torch wheels for Linux bundle the CUDA runtime,
# so `--gpus all` (NVIDIA Container Toolkit) is all a GPU run needs; without it runs use the CPU.
FROM python:3.11-slim-bookworm

ARG GIT_COMMIT=unknown
# Headless MuJoCo rendering through EGL (NVIDIA's EGL comes with the driver when "graphics" is
# among the capabilities); runs go to the /runs volume.
ENV MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RL_MTL_RUNS=/runs \
    RL_MTL_GIT_COMMIT=${GIT_COMMIT}

# g++: torch.compile builds the update's kernels with it (train.compile; on the CPU by default,
# and Triton's launcher on CUDA needs a C compiler too).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libegl1 libgl1 libglvnd0 g++ \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/rl-mtl
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY rl_mtl ./rl_mtl
COPY scripts ./scripts
RUN pip install -q -c constraints.txt -e .

RUN useradd --create-home --uid 1000 rlmtl && mkdir -p /runs && chown rlmtl /runs
USER 1000
VOLUME ["/runs"]
WORKDIR /runs
CMD ["python", "-m", "rl_mtl.train", "--help"]
