# One image for the API and both worker kinds (the API never imports torch; the image just carries it).
# GPU hosts: the default PyPI torch wheel is the CUDA build. CPU-only image:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
FROM python:3.12-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LONGDOC_DATA_DIR=/data

RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "$TORCH_INDEX_URL"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /app
# Dependencies first (cached while only the code changes), then the code as an editable install:
# storage.migrate finds the migrations at /app/alembic next to the packages.
COPY pyproject.toml README.md ./
COPY config/ config/
COPY longdoc/ longdoc/
COPY pipeline/ pipeline/
COPY storage/ storage/
COPY workers/ workers/
COPY api/ api/
COPY alembic/ alembic/
COPY alembic.ini ./
RUN pip install -e . \
    && useradd --create-home --uid 1000 longdoc \
    && mkdir -p /data && chown longdoc /data

USER longdoc
VOLUME ["/data"]
EXPOSE 8000
ENTRYPOINT []
CMD ["longdoc", "serve", "--host", "0.0.0.0", "--port", "8000"]
