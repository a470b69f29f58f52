# DT on a CUDA machine: docker build -t dt . && docker run --gpus all -v ~/.d4rl:/root/.d4rl dt --config_path configs/dt/hopper/medium_v2.yaml
FROM python:3.11-slim

# EGL/OSMesa libraries so MuJoCo can render headless (MUJOCO_GL=egl); simulation itself needs none of them
RUN apt-get update \
    && apt-get install -y --no-install-recommends libegl1 libgl1 libglvnd0 libosmesa6 \
    && rm -rf /var/lib/apt/lists/*
# --eval_video without a GPU: Mesa's software EGL (libEGL_mesa, the llvmpipe driver) and libOpenGL for PyOpenGL
RUN apt-get update && apt-get install -y --no-install-recommends libegl1 libopengl0 libgl1-mesa-dri \
    && rm -rf /var/lib/apt/lists/*
ENV MUJOCO_GL=egl \
    PYOPENGL_PLATFORM=egl \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    PYTHONUNBUFFERED=1

WORKDIR /workspace
# torch==2.13.0 from PyPI on Linux x86_64 is the CUDA build (its CUDA libraries come as pip packages)
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY . .

ENTRYPOINT ["python", "algorithms/dt.py"]
