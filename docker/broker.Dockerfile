# natter broker: one replica of a rendezvous fleet (or a lone broker without NATTER_REDIS).
#   docker build -f docker/broker.Dockerfile -t natter-broker .          (after make wheels)
# BASE must provide python3 with venv; CI builds without a registry: --build-arg BASE=natter-base:bookworm
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
COPY build/wheels /wheels
RUN python3 -m venv /opt/natter \
 && /opt/natter/bin/pip install --no-cache-dir --no-index --find-links /wheels natter \
 && /opt/natter/bin/pip uninstall -y pip

FROM ${BASE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/natter --create-home natter
COPY --from=build /opt/natter /opt/natter
ENV PATH=/opt/natter/bin:$PATH \
    NATTER_LISTEN=:10000 \
    NATTER_METRICS=:9100 \
    NATTER_LOG_FORMAT=json
USER 10001:10001
EXPOSE 10000/udp 10000/tcp 9100/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('NATTER_METRICS', ':9100').rsplit(':', 1)[1]; sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["natter"]
CMD ["broker"]
