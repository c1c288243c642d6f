#!/usr/bin/env bash
# Build the kipfix image without a Docker engine and without pulling anything:
#
#   1. debootstrap a Debian bookworm minbase root filesystem (cached tarball);
#   2. import it with buildah as docker.io/library/debian:bookworm-slim, the
#      Dockerfile's base (skipped while the tarball is unchanged);
#   3. buildah bud --pull=never --isolation chroot --layers (layers cached);
#   4. export the image's root filesystem (and its OCI config) for tests
#      (skipped while the image id is unchanged); optionally an archive for
#      `ctr images import` / `podman load` (--archive FILE).
#
# Usage: tests/image/build-image.sh [--archive FILE]
# Env:   KIPFIX_IMAGE_CACHE (default ~/.cache/kipfix-image), KIPFIX_IMAGE
#        (default localhost/kipfix:dev), DEBIAN_MIRROR (default deb.debian.org),
#        KIPFIX_BUILD_CA_BUNDLE (CA bundle for pip in the build; default the host's),
#        KIPFIX_BUILD_CONTEXT (default: this checkout).
# Last lines of output: rootfs=PATH, config=PATH, image=NAME, image_id=ID.
# Needs root and the Debian packages debootstrap and buildah.
set -euo pipefail

repo=$(cd "$(dirname "$0")/../.." && pwd)
context=${KIPFIX_BUILD_CONTEXT:-$repo}
cache=${KIPFIX_IMAGE_CACHE:-$HOME/.cache/kipfix-image}
image=${KIPFIX_IMAGE:-localhost/kipfix:dev}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base_tag=docker.io/library/debian:bookworm-slim
archive=
while [ $# -gt 0 ]; do
  case "$1" in
    --archive) archive=$2; shift 2 ;;
    *) echo "usage: $0 [--archive FILE]" >&2; exit 2 ;;
  esac
done

[ "$(id -u)" -eq 0 ] || { echo "build-image.sh must run as root (debootstrap, buildah)" >&2; exit 1; }
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install debootstrap buildah" >&2; exit 1; }
done

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9   # one build at a time (tests and a user may run this together)

start=$(date +%s.%N)
step_start=$start
log() { printf '[build-image] %s\n' "$*"; }
timed() {  # timed "what happened": print the time since the previous step
  local now; now=$(date +%s.%N)
  log "$(awk -v a="$step_start" -v b="$now" -v w="$1" 'BEGIN { printf "%-48s %6.1f s", w, b - a }')"
  step_start=$now
}

# ---- 1. base root filesystem ----------------------------------------------------
base_tar="$cache/debian-bookworm-minbase.tar"
if [ ! -f "$base_tar" ]; then
  rootfs="$cache/debootstrap.tmp"
  rm -rf "$rootfs"
  log "debootstrap bookworm (minbase) from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 || {
    tail -n 30 "$cache/debootstrap.log" >&2; exit 1; }
  # Look like the official debian:bookworm-slim: the same apt sources (with
  # updates and security), no docs/man pages/locales, no apt caches.
  rm -f "$rootfs/etc/apt/sources.list" "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/docker-no-recommends"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
         "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/*
  tar -C "$rootfs" --numeric-owner -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  rm -rf "$rootfs"
  timed "debootstrap bookworm minbase -> $(du -h "$base_tar" | cut -f1) tarball"
else
  timed "base rootfs tarball cached"
fi

# ---- 2. base image ------------------------------------------------------------------
base_sum=$(sha256sum "$base_tar" | cut -c1-16)
base_stamp="$cache/base-image.stamp"   # "<tarball sum> <image id>"
base_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$base_tag" 2>/dev/null || true)
if [ -z "$base_id" ] || [ "$(cat "$base_stamp" 2>/dev/null)" != "$base_sum $base_id" ]; then
  ctr=$(buildah from --pull=never scratch)
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  mnt=$(buildah mount "$ctr")
  tar -C "$mnt" --numeric-owner -xf "$base_tar"
  buildah umount "$ctr" >/dev/null
  buildah config --os linux --arch "$(dpkg --print-architecture)" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$base_tag" >/dev/null
  trap - EXIT
  base_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$base_tag")
  echo "$base_sum $base_id" >"$base_stamp"
  timed "imported base image $base_tag"
else
  timed "base image $base_tag up to date"
fi

# ---- 3. the kipfix image ---------------------------------------------------------------
# pip inside the build trusts what the host trusts (a TLS-intercepting proxy's CA,
# for one): the host's CA bundle goes in as a build secret, in no layer.
ca_bundle=${KIPFIX_BUILD_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
secret=()
[ -s "$ca_bundle" ] && secret=(--secret "id=ca-bundle,src=$ca_bundle")
log "buildah bud --pull=never --isolation chroot --layers ${secret[*]} -t $image $context"
buildah bud --pull=never --isolation chroot --layers --force-rm "${secret[@]}" -t "$image" -f "$context/Dockerfile" "$context" \
  >"$cache/bud.log" 2>&1 || { tail -n 40 "$cache/bud.log" >&2; exit 1; }
image_id=$(buildah inspect --type image --format '{{.FromImageID}}' "$image")
timed "built $image (${image_id:0:12})"

# ---- 4. root filesystem and config for tests ----------------------------------------------
rootfs_out="$cache/kipfix-dev.rootfs"
config_out="$cache/kipfix-dev.config.json"
if [ "$(cat "$cache/kipfix-dev.id" 2>/dev/null)" != "$image_id" ] || [ ! -d "$rootfs_out" ]; then
  rm -rf "$rootfs_out" "$rootfs_out.tmp"
  ctr=$(buildah from --pull=never "$image")
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
  mnt=$(buildah mount "$ctr")
  mkdir "$rootfs_out.tmp"
  tar -C "$mnt" --numeric-owner -cf - . | tar -C "$rootfs_out.tmp" --numeric-owner -xf -
  buildah umount "$ctr" >/dev/null
  buildah rm "$ctr" >/dev/null
  trap - EXIT
  buildah inspect --type image "$image" \
    | python3 -c 'import json, sys; json.dump(json.load(sys.stdin)["OCIv1"]["config"], sys.stdout, indent=2)' \
    >"$config_out"
  mv "$rootfs_out.tmp" "$rootfs_out"
  echo "$image_id" >"$cache/kipfix-dev.id"
  timed "exported root filesystem ($(du -sh "$rootfs_out" | cut -f1))"
else
  timed "exported root filesystem up to date"
fi

if [ -n "$archive" ]; then
  rm -f "$archive"
  buildah push --quiet "$image" "docker-archive:$archive:$image" >/dev/null
  timed "docker-archive $archive"
fi

step_start=$start
timed total
echo "rootfs=$rootfs_out"
echo "config=$config_out"
echo "image=$image"
echo "image_id=$image_id"
