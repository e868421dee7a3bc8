# vas-server on GPU: vLLM's official OpenAI image plus this package.
#   docker build -t vas-server .
#   docker run --gpus all -p 8000:8000 vas-server
#   docker run --gpus all -p 8000:8000 -v /models:/models vas-server \
#       /models/base --value-model helpful=/models/helpful
# Arguments after the image name go to `vas-server serve`.
FROM vllm/vllm-openai:v0.32.0

WORKDIR /opt/vas-server
COPY pyproject.toml README.md Makefile ./
COPY scripts/ scripts/
COPY vas_server/ vas_server/
COPY value_models/ value_models/
COPY docker/entrypoint.sh docker/entrypoint.sh

# The same setup as the README's `make setup`. There is no GPU while an image builds, so the
# setup script is told which vLLM build to install instead of probing with nvidia-smi.
ENV VAS_SETUP_FLAVOUR=gpu \
    VAS_VENV_SYSTEM_SITE_PACKAGES=1 \
    VAS_SERVER_CACHE=/opt/vas-server/cache
RUN bash scripts/setup.sh
# Convert the embedded base model now, so a container starts without the ~30 s conversion.
RUN .venv/bin/python -c "from vas_server.core.base_model import ensure_base_model; print(ensure_base_model())"

EXPOSE 8000
ENTRYPOINT ["bash", "docker/entrypoint.sh"]
