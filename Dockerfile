# syntax=docker/dockerfile:1
# redis-entra-proxy container image.
#
#   docker build -t redis-entra-proxy:0.1.0 .
#
# Stage 1 builds the release binary with the official Rust toolchain image (the crate's
# rust-version is 1.88). Stage 2 copies only that binary onto distroless "cc" (glibc, libgcc,
# CA certificates, no shell, no package manager), running as the numeric non-root user 65532.
# The proxy writes nothing to disk, so the image works with readOnlyRootFilesystem: true.

FROM rust:1.88-bookworm AS build
WORKDIR /src
# Cargo.lock is honoured exactly (--locked): the image has the same dependencies as CI.
COPY Cargo.toml Cargo.lock ./
# Only the library and binary sources: tests/, examples/ and bench/ are not part of the build.
COPY src ./src
RUN cargo build --release --locked --bin redis-entra-proxy \
    && strip target/release/redis-entra-proxy

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/redis-entra-proxy /usr/local/bin/redis-entra-proxy
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
# 6379: the Redis listener (--listen; the default 127.0.0.1:6379 is for a sidecar, a gateway
# listens on 0.0.0.0:6379). 9090: the admin endpoint (--admin-listen; use 0.0.0.0:9090 in
# Kubernetes so the kubelet's probes reach it).
EXPOSE 6379 9090
ENTRYPOINT ["/usr/local/bin/redis-entra-proxy"]
