# One image for every service in docker-compose.yml: the API, the workers and Flower.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/app/.venv/bin:$PATH TOKENIZERS_PARALLELISM=false \
    TORCH_HOME=/app/cache/torch HF_HOME=/app/cache/hf VAR_DIR=/app/var
WORKDIR /app

COPY requirements.txt .
RUN python -m venv .venv && .venv/bin/pip install -r requirements.txt

COPY . .
# Pre-fetch what the configured models need at build time, so containers start offline.
RUN .venv/bin/python scripts/prefetch.py \
    && useradd --system --home /app app && mkdir -p /app/var /app/cache && chown -R app /app/var /app/cache
ENV HF_HUB_OFFLINE=1
USER app
EXPOSE 8000 5555
