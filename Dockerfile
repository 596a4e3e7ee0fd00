# syntax=docker/dockerfile:1
# The rna container image: the binary, the libraries it links, CA certificates, nothing
# else (no shell, no package manager), run as the numeric non-root user 65532.
#
#   docker build -t REGISTRY/rna:VERSION .        (or: podman build / buildah build)
#
# Stages:
#   build     compiles rna in the official Rust image and assembles the runtime tree with
#             packaging/image-rootfs.sh.
#   prebuilt  takes a tree that packaging/image-rootfs.sh made outside, from the build
#             context's rootfs/ folder: for machines that cannot pull the Rust image
#             (CI: ci/artifacts.sh passes --build-arg ROOTFS=prebuilt).
#   runtime   FROM scratch plus that tree; the image users run.
# See docs/release.md and docs/operations.md (other architectures: --platform linux/arm64).

ARG RUST_IMAGE=docker.io/library/rust:1.89-bookworm
# Which stage supplies the runtime tree: build (default) or prebuilt.
ARG ROOTFS=build

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The tree copied in has no .git (see .dockerignore): pass the commit for `rna --version`,
# e.g. --build-arg RNA_GIT_COMMIT=$(git rev-parse --short=12 HEAD).
ARG RNA_GIT_COMMIT=unknown
ARG SOURCE_DATE_EPOCH=
RUN cargo build --release --locked --bin rna \
    && packaging/image-rootfs.sh target/release/rna /rootfs

FROM scratch AS prebuilt
COPY rootfs/ /rootfs/

FROM ${ROOTFS} AS rootfs

FROM scratch AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="rna" \
      org.opencontainers.image.description="Remote network agent and hub: SOCKS5 and Kubernetes access to private networks over one outbound QUIC connection" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/rna-project/rna" \
      org.opencontainers.image.licenses="Apache-2.0 OR MIT"
COPY --from=rootfs /rootfs/ /
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/usr/bin/rna"]
CMD ["--help"]
