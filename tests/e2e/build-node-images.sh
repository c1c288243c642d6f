#!/usr/bin/env bash
# Images for the e2e real node (realnode.py), as archives `ctr images import`
# loads into the node's containerd (nothing can be pulled):
#
#   kipfix   the Dockerfile's image (tests/image/build-image.sh), localhost/kipfix:dev
#   pause    containerd's sandbox image: images/pause.c, static, FROM scratch
#   traffic  the test pods: ping and iperf3 on the Debian base image
#
# Archives (docker-archive) go to ${KIPFIX_E2E_CACHE:-~/.cache/kipfix-e2e}/images
# and are rewritten only when the image id changes. Last lines of output:
# NAME=IMAGE ARCHIVE, one per image. Needs root, buildah, debootstrap, gcc.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache="${KIPFIX_E2E_CACHE:-$HOME/.cache/kipfix-e2e}/images"
kipfix_image=${KIPFIX_IMAGE:-localhost/kipfix:dev}
pause_image=localhost/kipfix-e2e-pause:1
traffic_image=localhost/kipfix-e2e-traffic:1
mkdir -p "$cache"
exec 8>"$cache/.lock"
flock 8

start=$(date +%s)
log() { printf '[build-node-images] %s (%d s)\n' "$*" "$(( $(date +%s) - start ))"; }

# The kipfix image and the Debian base image the traffic image starts from.
"$repo/tests/image/build-image.sh" >"$cache/build-image.log" 2>&1 || { tail -n 40 "$cache/build-image.log" >&2; exit 1; }
log "kipfix image $kipfix_image built"

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
gcc -static -Os -s -o "$ctx/pause" "$here/images/pause.c"
buildah bud --pull=never --isolation chroot --layers --quiet -t "$pause_image" \
  -f "$here/images/Containerfile.pause" "$ctx" >"$cache/pause.log" 2>&1 || { cat "$cache/pause.log" >&2; exit 1; }
log "pause image $pause_image built"
buildah bud --pull=never --isolation chroot --layers --quiet -t "$traffic_image" \
  -f "$here/images/Containerfile.traffic" "$ctx" >"$cache/traffic.log" 2>&1 || { tail -n 30 "$cache/traffic.log" >&2; exit 1; }
log "traffic image $traffic_image built"

export_archive() {  # NAME IMAGE: docker-archive in the cache, kept while the id is the same
  local name=$1 image=$2 id archive
  archive="$cache/$name.tar"
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$image")
  if [ "$(cat "$archive.id" 2>/dev/null)" != "$id" ] || [ ! -f "$archive" ]; then
    rm -f "$archive" "$archive.id"
    buildah push --quiet "$image" "docker-archive:$archive.tmp:$image" >/dev/null
    mv "$archive.tmp" "$archive"
    echo "$id" >"$archive.id"
    log "exported $image -> $archive ($(du -h "$archive" | cut -f1))"
  fi
}
export_archive kipfix "$kipfix_image"
export_archive pause "$pause_image"
export_archive traffic "$traffic_image"
log done
echo "kipfix=$kipfix_image $cache/kipfix.tar"
echo "pause=$pause_image $cache/pause.tar"
echo "traffic=$traffic_image $cache/traffic.tar"
