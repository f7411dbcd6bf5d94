# A local Redis image for tests and the compose try-out where no registry is reachable.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# the base is Debian stable: its redis-server version is fixed by the release
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/*
EXPOSE 6379
# hadolint ignore=DL3066
USER redis
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--save", "", "--appendonly", "no"]
