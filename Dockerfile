# CPU image: llama.cpp compiled for portable x86-64 (AVX2, no host-specific code: it runs on any AVX2 CPU),
# the default model baked in. Build: docker build -t local-llm-gateway:cpu .   (the CUDA variant: Dockerfile.cuda)
FROM python:3.11-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml setup.py README.md ./
COPY gateway gateway
COPY engines engines
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"
# Editable install: the gateway finds configs/ next to its package, so /app stays the project root.
RUN python -m venv /opt/venv \
    && CMAKE_ARGS="$LLAMA_CMAKE_ARGS" /opt/venv/bin/pip install --no-cache-dir -e '.[otel,redis]'
COPY scripts scripts
RUN LLM_MODELS_DIR=/models /opt/venv/bin/python scripts/fetch_model.py

FROM python:3.11-slim-bookworm
# libgomp: llama.cpp's CPU backend threads with OpenMP
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 1000 gateway
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=gateway /models /models
COPY --from=build /app /app
COPY configs /app/configs
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH LLM_HOST=0.0.0.0 LLM_PORT=8000 LLM_MODELS_DIR=/models HF_HOME=/cache/huggingface
RUN mkdir -p /cache/huggingface && chown gateway /cache/huggingface
USER gateway
EXPOSE 8000
CMD ["llm-gateway", "serve"]
