# The optimenv controller image (helm/optimenv runs it). Build from the repository root:
#   docker build -t ghcr.io/optimenv/optimenv-controller:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# Only what the package build needs: the controller image carries no torch, Ray or DeepSpeed.
COPY pyproject.toml README.md constraints.txt ./
COPY service ./service
COPY operators ./operators
# The tested versions (constraints.txt): the image gets the kopf / lightkube / httpx2 / pydantic
# versions the tests ran.
RUN pip install --no-cache-dir -c constraints.txt ".[controller]" \
    && rm -rf /src

# A numeric non-root user, so the pod's runAsNonRoot can be verified; the chart's runAsUser matches.
RUN groupadd --gid 10001 optimenv \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin optimenv
USER 10001:10001
WORKDIR /tmp

# Health (kopf liveness) and Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["optimenv", "controller"]
