#!/usr/bin/env bash
# Give BCC kernel headers for the running kernel. Host headers win when present;
# otherwise Debian's linux-headers-amd64 are linked under /lib/modules/$(uname -r)
# (a tc program needs only the generic headers, which the 6.1 package provides).
set -euo pipefail
mod="/lib/modules/$(uname -r)"
if [ -e "$mod/build/include/linux/kconfig.h" ] || [ -e "$mod/build/include/generated/autoconf.h" ]; then
  echo "[install] kernel headers present at $mod/build"
  exit 0
fi
arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1 || true)
[ -n "$arch" ] || { echo "no /usr/src/linux-headers-*-amd64: install linux-headers-amd64" >&2; exit 1; }
common="${arch%-amd64}-common"
[ -d "$common" ] || { echo "missing $common (linux-headers-*-common)" >&2; exit 1; }
mkdir -p "$mod"
ln -sfn "$arch" "$mod/build"
ln -sfn "$common" "$mod/source"
echo "[install] linked $mod/build -> $arch and $mod/source -> $common"
