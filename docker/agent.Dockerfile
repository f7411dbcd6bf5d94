# natter client agent: listens for peers and/or forwards local ports to them.
#   docker run -e NATTER_NAME=bob -e NATTER_BROKER=broker.example:10000 natter-agent listen
#   docker run -e NATTER_NAME=alice -e NATTER_BROKER=... natter-agent forward 0.0.0.0:8022:bob:22
# The identity key lives in the state directory: keep /var/lib/natter on a volume.
# The native QUIC engine (libs/natter-quic) is in the image when scripts/images.sh built its
# wheel (a host with cargo): NATTER_QUIC_ENGINE=native picks it.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
COPY build/wheels /wheels
RUN python3 -m venv /opt/natter \
 && /opt/natter/bin/pip install --no-cache-dir --no-index --find-links /wheels natter \
 && if ls /wheels/natter_quic-*.whl >/dev/null 2>&1; then \
      /opt/natter/bin/pip install --no-cache-dir --no-index /wheels/natter_quic-*.whl; fi \
 && /opt/natter/bin/pip uninstall -y pip

FROM ${BASE}
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/natter --create-home natter
COPY --from=build /opt/natter /opt/natter
ENV PATH=/opt/natter/bin:$PATH \
    NATTER_STATE_DIR=/var/lib/natter \
    NATTER_LOG_FORMAT=json
USER 10001:10001
VOLUME ["/var/lib/natter"]
ENTRYPOINT ["natter"]
CMD ["listen"]
