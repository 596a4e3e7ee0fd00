#!/usr/bin/env bash
# Assembles the container image's whole filesystem from one rna binary: the binary, the
# shared libraries it links (as ldd names them, so any architecture works), the CA
# certificates, passwd/group entries for the non-root user 65532, and an empty /tmp.
# Nothing else: no shell, no package manager.
#
# Usage: packaging/image-rootfs.sh BINARY OUT_DIR
#   BINARY   an rna built for the machine running this script (ldd must be able to read it)
#   OUT_DIR  created; must not exist yet
# The Dockerfile's build stage runs it; CI runs it on a binary cargo built on the host
# (ci/artifacts.sh).
set -euo pipefail

if [ "$#" -ne 2 ]; then
    echo "usage: $0 BINARY OUT_DIR" >&2
    exit 2
fi
bin=$1
out=$2
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
here=$(cd "$(dirname "$0")/.." && pwd)

[ -x "$bin" ] || { echo "$0: $bin is not an executable" >&2; exit 1; }
[ -s "$ca_bundle" ] || { echo "$0: no CA bundle at $ca_bundle (install ca-certificates)" >&2; exit 1; }
[ ! -e "$out" ] || { echo "$0: $out exists; give a new folder" >&2; exit 1; }

mkdir -p "$out/usr/bin" "$out/etc/ssl/certs" "$out/usr/share/doc/rna"
install -m 0755 "$bin" "$out/usr/bin/rna"
# Debug line tables help backtraces on a developer machine, not in an image.
"${STRIP:-strip}" --strip-unneeded "$out/usr/bin/rna"

# Every library the dynamic loader would map, and the loader itself, at the path the binary
# asks for. `ldd` prints "name => /path (addr)" for libraries and "/path (addr)" for the loader.
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
[ -n "$libs" ] || { echo "$0: ldd found no libraries in $bin" >&2; exit 1; }
for lib in $libs; do
    mkdir -p "$out$(dirname "$lib")"
    # -L: the real file, not a symlink into a tree the image does not have.
    cp -L "$lib" "$out$lib"
    chmod 0755 "$out$lib"
done

install -m 0644 "$ca_bundle" "$out/etc/ssl/certs/ca-certificates.crt"
# Name lookups of the numeric user work (logs, `id`), and glibc finds hosts and DNS.
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$out/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$out/etc/group"
printf 'hosts: files dns\n' >"$out/etc/nsswitch.conf"
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/nsswitch.conf"
install -m 0644 "$here/LICENSE-APACHE" "$here/LICENSE-MIT" "$out/usr/share/doc/rna/"
# A writable scratch folder for tools that expect one; with readOnlyRootFilesystem mount an
# emptyDir here.
mkdir -p "$out/tmp"
chmod 1777 "$out/tmp"
