# One image for every sow stage: `docker run IMAGE publish`, `... cache`, `... serve-api`, ...
#   docker build -t sow .
#   docker run --rm sow --help
# docker-compose.yml builds it once (`build: .`) and runs each stage from it.

# --- the web dashboard: a static export that `sow serve-api` serves at /market -----------------
FROM node:22-slim AS dashboard
WORKDIR /web
COPY frontend/package.json frontend/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY frontend/ ./
RUN npm run build

# --- the sow command -------------------------------------------------------------------------
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md CHANGELOG.md config.json ./
COPY sowcli ./sowcli
COPY completions ./completions
RUN pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin sow
# api_static_dir defaults to frontend/out (relative to the working directory /app)
COPY --from=dashboard /web/out ./frontend/out

USER sow
# inside a container, listen on every interface (publish ports to choose what is reachable)
ENV SOW_API_HOST=0.0.0.0 \
    SOW_METRICS_HOST=0.0.0.0
# 8080: serve-api (REST, /health, /metrics, /ws, /market); 8081: serve-ws; 9100: --metrics-port
EXPOSE 8080 8081 9100
ENTRYPOINT ["sow"]
CMD ["--help"]
