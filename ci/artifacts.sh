#!/usr/bin/env bash
# Builds and checks what users install: the container image, the Debian package, the
# kustomize base, and that the dependency tree resolves for arm64. .ci/run calls it; a
# developer can run it alone (as root: it mounts images, installs into a chroot).
#
# Usage: ci/artifacts.sh [image] [deb] [kustomize] [arm64]     (no argument: all four)
# Environment:
#   RNA_BIN        the release binary to ship (default: cargo build --release --locked)
#   RNA_IMAGE_TAG  tag of the image built (default: localhost/rna:VERSION)
#
# No base image is pulled: the runtime stage of the Dockerfile starts FROM scratch and takes
# a tree packaging/image-rootfs.sh makes from RNA_BIN (--build-arg ROOTFS=prebuilt). The
# checks of the image and of the package are first run against broken copies (a missing
# file, a root user, a binary that does not start, a shell) and must fail there, so a check
# that passes everything cannot slip in.
set -euo pipefail

cd "$(dirname "$0")/.."
root=$(pwd)

say() { echo "--- artifacts: $*"; }
fail() { echo "artifacts: FAIL: $*" >&2; return 1; }

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
work=$(mktemp -d /tmp/rna-artifacts.XXXXXX)
cleanup() {
    if [ -n "${dev_pid:-}" ]; then kill "$dev_pid" 2>/dev/null || true; fi
    if [ -n "${mounted_image:-}" ]; then podman image unmount "$mounted_image" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

need() {
    local missing=() tool
    for tool in "$@"; do
        IFS=: read -r cmd pkg <<<"$tool"
        command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

release_bin() {
    if [ -z "${RNA_BIN:-}" ]; then
        say "cargo build --release --locked"
        cargo build --release --locked --bin rna
        RNA_BIN=$root/target/release/rna
    fi
    [ -x "$RNA_BIN" ] || fail "no binary at $RNA_BIN"
}

# Starts `rna dev` in the chroot ROOT as UID:GID on ports the kernel
# picks, waits (bounded) until it prints its SOCKS5 example, and fetches the hub's
# /healthz through the agent with curl over that SOCKS5 proxy: the binary starts, TLS and
# QUIC work, and it runs as the expected user.
start_dev() {
    local rootdir=$1 user=$2 state=$3 log=$4
    chroot --userspec="$user" "$rootdir" /usr/bin/rna dev --dir "$state" --socks 127.0.0.1:0 --api 127.0.0.1:0 >"$log" 2>&1 &
    dev_pid=$!
    local line="" i
    for i in $(seq 1 120); do
        line=$(grep -m1 '^curl --proxy socks5h://' "$log" || true)
        [ -n "$line" ] && break
        kill -0 "$dev_pid" 2>/dev/null || break
        sleep 0.5
    done
    if [ -z "$line" ]; then
        cat "$log" >&2
        kill "$dev_pid" 2>/dev/null || true
        wait "$dev_pid" 2>/dev/null || true
        dev_pid=
        fail "rna dev did not come up in $rootdir"
        return 1
    fi
    local uid
    uid=$(awk '/^Uid:/ { print $2 }' "/proc/$dev_pid/status")
    local ok=0
    # shellcheck disable=SC2086 # the printed command line is split into curl's arguments
    body=$(timeout 30 curl --silent --show-error --fail --max-time 20 ${line#curl } 2>&1 || true)
    kill "$dev_pid" 2>/dev/null || true
    wait "$dev_pid" 2>/dev/null || true
    dev_pid=
    [ "$uid" = "${user%%:*}" ] || { fail "rna dev ran as uid $uid, not ${user%%:*}"; return 1; }
    case "$body" in
        *ok*) ok=1 ;;
    esac
    [ "$ok" = 1 ] || { fail "no /healthz through SOCKS5 from rna dev in $rootdir: $body"; return 1; }
}

# --- image --------------------------------------------------------------------------------

# The filesystem of an image, ROOT, with the image's USER: the files the image needs are
# there, nothing that gives a shell is, the user is not root, the binary starts.
check_image_root() {
    local rootdir=$1 user=$2 f
    for f in usr/bin/rna etc/ssl/certs/ca-certificates.crt etc/passwd etc/group \
        usr/share/doc/rna/LICENSE-APACHE usr/share/doc/rna/LICENSE-MIT tmp; do
        [ -e "$rootdir/$f" ] || { fail "image lacks /$f"; return 1; }
    done
    local found
    found=$(find "$rootdir" \( -name sh -o -name bash -o -name dash -o -name ash -o -name busybox \
        -o -name apt -o -name apt-get -o -name dpkg -o -name rpm -o -name apk -o -name dnf \
        -o -name yum -o -name microdnf \) -print | sed "s|^$rootdir||")
    [ -z "$found" ] || { fail "image has a shell or package manager: $found"; return 1; }
    case "$user" in
        [0-9]*:[0-9]*) ;;
        *) fail "image user '$user' is not numeric uid:gid"; return 1 ;;
    esac
    [ "${user%%:*}" != 0 ] || { fail "image runs as root ($user)"; return 1; }
    local shown
    shown=$(chroot --userspec="$user" "$rootdir" /usr/bin/rna --version 2>&1 | head -n 1) || true
    [ "$shown" = "rna $version" ] || { fail "rna --version in the image said: $shown"; return 1; }
    start_dev "$rootdir" "$user" /tmp/dev "$work/dev-image.log"
}

image() {
    need podman:podman curl:curl
    release_bin
    local tag=${RNA_IMAGE_TAG:-localhost/rna:$version}
    say "image: packaging/image-rootfs.sh + podman build --build-arg ROOTFS=prebuilt"
    local started=$SECONDS
    mkdir -p "$work/context"
    packaging/image-rootfs.sh "$RNA_BIN" "$work/context/rootfs"
    podman build --quiet -f Dockerfile --target runtime --build-arg ROOTFS=prebuilt \
        --build-arg "VERSION=$version" -t "$tag" "$work/context" >/dev/null

    local user entry labels size
    user=$(podman image inspect --format '{{.Config.User}}' "$tag")
    entry=$(podman image inspect --format '{{json .Config.Entrypoint}}' "$tag")
    [ "$entry" = '["/usr/bin/rna"]' ] || fail "entrypoint is $entry"
    for label in version source licenses; do
        labels=$(podman image inspect --format "{{index .Labels \"org.opencontainers.image.$label\"}}" "$tag")
        [ -n "$labels" ] && [ "$labels" != "<no value>" ] || fail "no org.opencontainers.image.$label label"
    done
    labels=$(podman image inspect --format '{{index .Labels "org.opencontainers.image.version"}}' "$tag")
    [ "$labels" = "$version" ] || fail "version label $labels, Cargo.toml $version"

    # podman run is not available on every CI machine (crun may not set rlimits there): the
    # image's filesystem is copied out and run with chroot as the image's user.
    local mnt
    mnt=$(podman image mount "$tag")
    mounted_image=$tag
    mkdir -p "$work/image-root"
    cp -a "$mnt/." "$work/image-root/"
    podman image unmount "$tag" >/dev/null
    mounted_image=

    say "image: the checks refuse broken images"
    selftest_image "$work/image-root" "$user"
    say "image: checking $tag"
    check_image_root "$work/image-root" "$user"
    size=$(podman image inspect --format '{{.Size}}' "$tag")
    say "image: OK: $tag, user $user, size $((size / 1024 / 1024)) MiB ($size bytes), $((SECONDS - started)) s"
}

# Each broken copy must be refused; a check that accepts one is itself broken.
selftest_image() {
    local good=$1 user=$2 case_root
    expect_refused() {
        local what=$1; shift
        if ( "$@" ) >"$work/selftest.log" 2>&1; then
            cat "$work/selftest.log" >&2
            fail "the image check accepted an image with $what"
        fi
        echo "refused, as it must: $what ($(grep -m1 'FAIL' "$work/selftest.log" | sed 's/^artifacts: FAIL: //'))"
    }
    case_root=$work/broken
    rm -rf "$case_root" && cp -a "$good" "$case_root" && rm "$case_root/etc/ssl/certs/ca-certificates.crt"
    expect_refused "no CA certificates" check_image_root "$case_root" "$user"
    expect_refused "a root user" check_image_root "$good" 0:0
    rm -rf "$case_root" && cp -a "$good" "$case_root" && : >"$case_root/usr/bin/rna"
    expect_refused "a binary that does not start" check_image_root "$case_root" "$user"
    rm -rf "$case_root" && cp -a "$good" "$case_root" && mkdir -p "$case_root/bin" && cp "$case_root/usr/bin/rna" "$case_root/bin/sh"
    expect_refused "a shell" check_image_root "$case_root" "$user"
    rm -rf "$case_root"
}

# --- Debian package -----------------------------------------------------------------------

# Files the package must install.
deb_files=(
    usr/bin/rna
    lib/systemd/system/rna-hub.service
    lib/systemd/system/rna-agent.service
    lib/systemd/system/rna-agent@.service
    usr/share/doc/rna/examples/hub.toml
    usr/share/doc/rna/examples/agent.toml
    usr/share/doc/rna/copyright
    usr/share/man/man1/rna.1.gz
    usr/share/man/man1/rna-hub.1.gz
    usr/share/man/man1/rna-agent.1.gz
    usr/share/bash-completion/completions/rna
    usr/share/zsh/vendor-completions/_rna
    usr/share/fish/vendor_completions.d/rna.fish
)

# A Debian root with the package installed: the files are there, every unit runs under
# DynamicUser (never root), systemd-analyze verify accepts the units, the binary starts.
check_deb_root() {
    local rootdir=$1 f unit
    for f in "${deb_files[@]}"; do
        [ -e "$rootdir/$f" ] || { fail "package did not install /$f"; return 1; }
    done
    for unit in rna-hub.service rna-agent.service rna-agent@.service; do
        grep -q '^DynamicUser=yes' "$rootdir/lib/systemd/system/$unit" || { fail "$unit has no DynamicUser=yes"; return 1; }
        if grep -Eq '^User=(root|0)?$' "$rootdir/lib/systemd/system/$unit"; then
            fail "$unit runs as root"; return 1
        fi
        grep -q '^ExecStart=/usr/bin/rna ' "$rootdir/lib/systemd/system/$unit" || { fail "$unit does not run /usr/bin/rna"; return 1; }
    done
    local out
    # Warnings count: systemd "ignores" a line it cannot parse, which would silently drop a
    # setting of the unit.
    if ! out=$(systemd-analyze verify --root="$rootdir" rna-hub.service rna-agent.service rna-agent@prod.service 2>&1) \
        || [ -n "$out" ]; then
        fail "systemd-analyze verify: $out"; return 1
    fi
    local shown
    shown=$(chroot "$rootdir" /usr/bin/rna --version 2>&1 | head -n 1) || true
    [ "$shown" = "rna $version" ] || { fail "installed rna --version said: $shown"; return 1; }
    start_dev "$rootdir" 65532:65532 /tmp/dev "$work/dev-deb.log"
}

deb() {
    need dpkg-deb:dpkg dpkg-shlibdeps:dpkg-dev lintian:lintian mmdebstrap:mmdebstrap \
        systemd-analyze:systemd curl:curl
    release_bin
    local started=$SECONDS
    say "deb: packaging/deb.sh"
    local pkg
    pkg=$(packaging/deb.sh "$RNA_BIN" "$root/target/deb" | tail -n 1)

    say "deb: lintian $pkg"
    local lint
    lint=$(lintian --allow-root --fail-on error "$pkg" 2>&1) || { echo "$lint" >&2; fail "lintian reports errors"; }
    echo "lintian: ${lint:-no tags}"
    if dpkg-deb --ctrl-tarfile "$pkg" | tar -t | grep -Eq '(pre|post)(inst|rm)$'; then
        fail "the package has maintainer scripts"
    fi

    # A minimal Debian with systemd and procps (so verify finds sysinit.target and
    # the ExecReload /bin/kill), made
    # from the package mirror: no image registry needed.
    say "deb: mmdebstrap a scratch root and install the package"
    local chroot_dir=$work/debian
    mmdebstrap --quiet --variant=minbase --include=systemd,procps bookworm "$chroot_dir" >/dev/null
    dpkg --root="$chroot_dir" --force-script-chrootless -i "$pkg" >/dev/null
    say "deb: the checks refuse broken installs"
    selftest_deb "$chroot_dir"
    say "deb: checking the installed package"
    check_deb_root "$chroot_dir"
    say "deb: OK: $pkg ($(du -k "$pkg" | cut -f1) KiB), $((SECONDS - started)) s"
}

selftest_deb() {
    local good=$1 unit=$1/lib/systemd/system/rna-hub.service
    local saved=$work/saved
    expect_refused_deb() {
        local what=$1
        if ( check_deb_root "$good" ) >"$work/selftest.log" 2>&1; then
            cat "$work/selftest.log" >&2
            fail "the package check accepted an install with $what"
        fi
        echo "refused, as it must: $what ($(grep -m1 'FAIL' "$work/selftest.log" | sed 's/^artifacts: FAIL: //'))"
    }
    mv "$good/usr/share/zsh/vendor-completions/_rna" "$saved"
    expect_refused_deb "no zsh completion"
    mv "$saved" "$good/usr/share/zsh/vendor-completions/_rna"
    cp "$unit" "$saved"
    sed -i 's/^DynamicUser=yes/User=root/' "$unit"
    expect_refused_deb "a unit running as root"
    cp "$saved" "$unit"
    sed -i 's/^Type=notify/Type=bogus/' "$unit"
    expect_refused_deb "a unit systemd rejects"
    cp "$saved" "$unit"
    cp "$good/usr/bin/rna" "$saved"
    : >"$good/usr/bin/rna"
    expect_refused_deb "a binary that does not start"
    cp "$saved" "$good/usr/bin/rna"
    rm -f "$saved"
}

# --- kustomize and arm64 ------------------------------------------------------------------

kustomize() {
    need kubectl:kubernetes-client
    say "kustomize: kubectl kustomize deploy/kubernetes"
    local rendered images
    rendered=$(kubectl kustomize deploy/kubernetes)
    images=$(echo "$rendered" | sed -n 's/^ *image: *//p' | sort -u)
    # Every workload runs the image the README's build command tags, nothing else.
    [ "$images" = "localhost/rna:$version" ] || fail "rendered images: $images (want localhost/rna:$version)"
    [ "$(echo "$rendered" | grep -c '^kind: Deployment')" = 2 ] || fail "the base lacks a Deployment"
    if grep -En '^\s*image:' deploy/kubernetes/*.yaml | grep -v 'image: rna ' ; then
        fail "a manifest names an image other than the placeholder rna"
    fi
    say "kustomize: OK ($images)"
}

arm64() {
    say "arm64: the dependency tree resolves for aarch64-unknown-linux-gnu"
    cargo tree --locked --target aarch64-unknown-linux-gnu -e normal,build --prefix none >"$work/tree-arm64"
    grep -q '^ring ' "$work/tree-arm64" || fail "ring missing from the arm64 tree"
    grep -q 'aarch64-unknown-linux-gnu' deny.toml || fail "deny.toml does not judge aarch64-unknown-linux-gnu"
    # No code of ours may assume x86: an arch-specific cfg would need an arm64 twin.
    if grep -rnE 'target_arch *= *"(x86|x86_64)"|core::arch::x86|std::arch::x86|asm!' src build.rs; then
        fail "x86-only code in src/"
    fi
    say "arm64: OK ($(wc -l <"$work/tree-arm64") lines in cargo tree)"
}

steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(kustomize arm64 image deb)
for step in "${steps[@]}"; do
    case "$step" in
        image | deb | kustomize | arm64) "$step" ;;
        *) echo "usage: $0 [image] [deb] [kustomize] [arm64]" >&2; exit 2 ;;
    esac
done
