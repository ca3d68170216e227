#!/usr/bin/env bash
# Builds the image muster:local from a muster binary and the shared libraries it links,
# plus Debian's static busybox for a shell (health checks, the process executor). No
# registry is needed: the image starts FROM scratch, nothing is pulled.
#
#   deploy/build-image.sh                          # builds the release binary first
#   deploy/build-image.sh path/to/muster           # uses that binary
#   deploy/build-image.sh path/to/muster my:tag    # and tags the image my:tag
# MUSTER_BIN and MUSTER_IMAGE (the tag; default muster:local) do the same as the arguments.
# A muster-rsh beside the binary (or MUSTER_RSH) is installed too, for MPI runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-${MUSTER_BIN:-}}"
tag="${2:-${MUSTER_IMAGE:-muster:local}}"
if [ -z "$bin" ]; then
  (cd "$here/.." && cargo build --release --bin muster)
  bin="${CARGO_TARGET_DIR:-$here/../target}/release/muster"
fi
[ -x "$bin" ] || { echo "no muster binary at $bin" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "install Debian's busybox-static (apt-get install busybox-static)" >&2; exit 1; }
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/bin" "$ctx/rootfs/tmp" "$ctx/rootfs/etc"
cp "$bin" "$ctx/rootfs/usr/local/bin/muster"
cp /bin/busybox "$ctx/rootfs/bin/busybox"
# MPI runs' rsh helper (statically linked), when built beside the binary (MUSTER_RSH names
# another): the agent finds it next to itself.
rsh="${MUSTER_RSH:-$(dirname "$bin")/muster-rsh}"
if [ -x "$rsh" ]; then
  cp "$rsh" "$ctx/rootfs/usr/local/bin/muster-rsh"
fi
# The binary's shared libraries and the dynamic loader, at the same paths.
for lib in $(ldd "$bin" | grep -o '/[^ )]*'); do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
echo "root:x:0:0:root:/root:/bin/sh" > "$ctx/rootfs/etc/passwd"
echo "hosts: files dns" > "$ctx/rootfs/etc/nsswitch.conf"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/usr/local/bin:/bin
ENTRYPOINT ["/usr/local/bin/muster"]
DOCKERFILE
docker build -q -t "$tag" "$ctx"
echo "built $tag from $bin"
