# The tilebridge ingest (and dashboard) image for deploy/compose.yaml; build context: the
# repository root. Only the packages go in: no tests, no developer tools.
FROM python:3.11-slim-bookworm

COPY pyproject.toml README.md /src/
COPY tilebridge_protocol /src/tilebridge_protocol
COPY tilebridge_runtime /src/tilebridge_runtime
COPY tilebridge_storage /src/tilebridge_storage
COPY tilebridge_imswitch /src/tilebridge_imswitch
COPY edge_agent /src/edge_agent
COPY server_ingest /src/server_ingest
RUN pip install --no-cache-dir "/src[ingest]" fastapi uvicorn \
    && rm -rf /src \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin tilebridge \
    && install -d -o tilebridge -g tilebridge -m 0750 /var/lib/tilebridge-ingest

USER tilebridge
VOLUME ["/var/lib/tilebridge-ingest"]
EXPOSE 8090 9810
ENTRYPOINT ["server-ingest"]
CMD ["--config", "/etc/tilebridge/ingest.json", "run"]
