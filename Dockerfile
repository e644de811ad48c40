# One image with every Tidemark binary; docker-compose.yml picks the command.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
      -p tidemark-ingest -p tidemark-speed -p tidemark-compactor \
      -p tidemark-serving -p tidemark-generator \
 && mkdir -p /out \
 && cp target/release/tidemark-ingest target/release/tidemark-speed \
       target/release/tidemark-compactor target/release/tidemark-serving \
       target/release/tidemark-generator /out/

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
USER 10001
ENV TIDEMARK_TELEMETRY__LOG_FORMAT=json
