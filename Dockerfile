# syntax=docker/dockerfile:1
# token-exchange: build with `docker build -t token-exchange .`, run with
#   docker run -p 8080:8080 -p 8081:8081 -p 9090:9090 -v tokex-data:/app/data token-exchange
# For MySQL/MariaDB set TOKEX_DATABASE_URL=mysql://user:pass@host:3306/db and TOKEX_MASTER_KEY.

FROM rust:1-bookworm AS builder
# Pingora builds zlib-ng with cmake and links OpenSSL.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin token-exchange \
    && install -m 0755 target/release/token-exchange /usr/local/bin/token-exchange

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 tokex \
    && useradd --system --uid 10001 --gid tokex --home-dir /app --shell /usr/sbin/nologin tokex \
    && mkdir -p /app/conf /app/data \
    && chown -R tokex:tokex /app
COPY --from=builder /usr/local/bin/token-exchange /usr/local/bin/token-exchange
COPY --chown=tokex:tokex conf/token-exchange.toml /app/conf/token-exchange.toml
WORKDIR /app
USER tokex
# Inside a container the listeners must face the network; the file's defaults are loopback only.
ENV TOKEX_CONFIG=/app/conf/token-exchange.toml \
    TOKEX_DATA_DIR=/app/data \
    TOKEX_DATABASE_URL=sqlite:///app/data/token-exchange.db \
    TOKEX_GATEWAY_LISTEN=0.0.0.0:8080 \
    TOKEX_ADMIN_LISTEN=0.0.0.0:8081 \
    TOKEX_METRICS_LISTEN=0.0.0.0:9090
VOLUME ["/app/conf", "/app/data"]
EXPOSE 8080 8081 9090
STOPSIGNAL SIGTERM
ENTRYPOINT ["token-exchange"]
CMD ["serve"]
