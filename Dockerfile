# vas-server on GPU: vLLM's official OpenAI image plus this package.
#   docker build -t vas-server .
#   docker run --gpus all --ipc=host -p 8000:8000 vas-server
#   docker run --gpus all --ipc=host -p 8000:8000 -v /models:/models vas-server \
#       /models/base --value-model helpful=/models/helpful
# Arguments after the image name go to `vas-server serve`; docs/SERVER.md, "Docker".
#
# The same two stages as the CPU image (docker/Dockerfile.cpu): `build` runs the README's setup
# (scripts/setup.sh, server only; vLLM itself is the base image's) and converts the embedded base
# model; the runtime image takes the finished /opt/vas-server and none of the build's leftovers.
FROM vllm/vllm-openai:v0.32.0 AS build
WORKDIR /opt/vas-server
COPY pyproject.toml README.md Makefile ./
COPY scripts/ scripts/
COPY vas_server/ vas_server/
COPY value_models/ value_models/
# There is no GPU while an image builds, so setup is told which vLLM build to install instead of
# probing with nvidia-smi; the venv sees the base image's vllm==0.32.0 and installs nothing more
# for it.
ENV VAS_SETUP_FLAVOUR=gpu \
    VAS_SETUP_EXTRAS= \
    VAS_VENV_SYSTEM_SITE_PACKAGES=1 \
    VAS_SERVER_CACHE=/opt/vas-server/cache \
    PIP_NO_CACHE_DIR=1
RUN bash scripts/setup.sh
COPY docker/entrypoint.sh docker/healthcheck.py docker/trim-venv.sh docker/
# Convert the embedded base model now, so a container starts without the ~30 s conversion; then
# drop what serving never loads (docker/trim-venv.sh says what and why).
RUN .venv/bin/python -c "from vas_server.core.base_model import ensure_base_model; print(ensure_base_model())" \
    && sh docker/trim-venv.sh

FROM vllm/vllm-openai:v0.32.0
COPY --from=build /opt/vas-server /opt/vas-server
WORKDIR /opt/vas-server
ENV VAS_SERVER_CACHE=/opt/vas-server/cache
EXPOSE 8000
# vLLM's /health: 200 once the engine is up (it is outside the API key's reach).
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 CMD [".venv/bin/python", "docker/healthcheck.py"]
ENTRYPOINT ["bash", "docker/entrypoint.sh"]
