#!/usr/bin/env bash
# Build the goflow2 IPFIX collector the interop tests start, from its Go
# module at a pinned version, into a cache outside the repository:
#
#   ${KIPFIX_COLLECTORS_CACHE:-~/.cache/kipfix-collectors}/bin/goflow2
#
# A stamp records the version and Go toolchain; a second run with nothing
# changed does nothing. Needs only Go and the Go module proxy. Called by
# scripts/install.sh --test.
#
# Usage: bash tests/interop/build-goflow2.sh [--force]
set -euo pipefail

GOFLOW2_MODULE=github.com/netsampler/goflow2/v2/cmd/goflow2
GOFLOW2_VERSION=v2.2.6

cache="${KIPFIX_COLLECTORS_CACHE:-${HOME}/.cache/kipfix-collectors}"
bin="${cache}/bin"
stamp="${bin}/.goflow2-stamp"
force=0
[[ "${1:-}" == "--force" ]] && force=1

if ! command -v go >/dev/null 2>&1; then
    echo "build-goflow2: 'go' not found on PATH; install Go >= 1.21" >&2
    exit 1
fi
mkdir -p "${bin}"
exec 9>"${cache}/.lock"   # one build at a time
flock 9

want="${GOFLOW2_MODULE}@${GOFLOW2_VERSION} $(go env GOVERSION GOOS GOARCH | tr '\n' ' ')"
if [[ ${force} == 0 && -x "${bin}/goflow2" && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
    echo "build-goflow2: up to date: ${bin}/goflow2 (${GOFLOW2_VERSION})"
    exit 0
fi
echo "build-goflow2: building ${GOFLOW2_MODULE}@${GOFLOW2_VERSION} into ${bin}"
GOBIN="${bin}" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "${GOFLOW2_MODULE}@${GOFLOW2_VERSION}"
echo "${want}" > "${stamp}"
"${bin}/goflow2" -v 2>&1 | head -1 || true
