#!/usr/bin/env bash
# Build the binaries the e2e tests start: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, kubelet (from
# tests/e2e/tools, a module that pins k8s.io/kubernetes) and helm (go install at a pinned
# version). Output goes to a cache outside the repository:
#
#   ${KIPFIX_E2E_CACHE:-~/.cache/kipfix-e2e}/bin
#
# A stamp file records what was built (versions, go.mod/go.sum hash, Go
# version); a second run with nothing changed does nothing. Safe to call
# from scripts/install.sh. Needs only Go (>= 1.24) and the Go module proxy.
#
# Usage: bash tests/e2e/build-tools.sh [--force]
set -euo pipefail

KUBERNETES_VERSION=v1.33.13  # keep in step with tools/go.mod
HELM_VERSION=v3.18.6

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${KIPFIX_E2E_CACHE:-${HOME}/.cache/kipfix-e2e}"
bin="${cache}/bin"
stamp="${bin}/.stamp"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet helm)

force=0
[[ "${1:-}" == "--force" ]] && force=1

if ! command -v go >/dev/null 2>&1; then
    echo "build-tools: 'go' not found on PATH; install Go >= 1.24" >&2
    exit 1
fi

minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
k8s_ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    k8s_ldflags+=" -X ${pkg}.gitVersion=${KUBERNETES_VERSION}"
    k8s_ldflags+=" -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
    k8s_ldflags+=" -X ${pkg}.gitTreeState=clean"
done

mkdir -p "${bin}"
# One build at a time (install.sh and a manual run may overlap).
exec 9>"${cache}/.lock"
flock 9

# Everything that decides what the binaries are.
want="$( {
    echo "kubernetes=${KUBERNETES_VERSION} helm=${HELM_VERSION} ldflags=${k8s_ldflags}"
    echo "binaries=${binaries[*]} cgo=0"
    go env GOVERSION GOOS GOARCH
    cat "${here}/tools/go.mod" "${here}/tools/go.sum"
} | sha256sum | cut -d' ' -f1)"

all_present=1
for b in "${binaries[@]}"; do
    [[ -x "${bin}/${b}" ]] || all_present=0
done
if [[ ${force} == 0 && ${all_present} == 1 && -f "${stamp}" && "$(cat "${stamp}")" == "${want}" ]]; then
    echo "build-tools: up to date in ${bin} (kubernetes ${KUBERNETES_VERSION}, helm ${HELM_VERSION})"
    exit 0
fi

rm -f "${stamp}"
export GOTOOLCHAIN=local   # never fetch another toolchain
export CGO_ENABLED=0       # static binaries, no C toolchain needed
start=$(date +%s)
step() { echo "build-tools: $* ($(( $(date +%s) - start )) s elapsed)"; }

tmp="$(mktemp -d "${cache}/build.XXXXXX")"
trap 'rm -rf "${tmp}"' EXIT

step "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet ${KUBERNETES_VERSION}"
(
    cd "${here}/tools"
    GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -ldflags "${k8s_ldflags}" -o "${tmp}/" \
        k8s.io/kubernetes/cmd/kube-apiserver \
        k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler \
        k8s.io/kubernetes/cmd/kubectl \
        k8s.io/kubernetes/cmd/kubelet
    step "building etcd (the version k8s.io/kubernetes ${KUBERNETES_VERSION} requires)"
    GOFLAGS="-mod=mod -buildvcs=false" go build -trimpath -ldflags "-s -w" -o "${tmp}/etcd" \
        go.etcd.io/etcd/server/v3
)

step "building helm ${HELM_VERSION}"
(
    cd "${tmp}"  # outside any module: go install pkg@version
    GOFLAGS="-buildvcs=false" GOBIN="${tmp}" go install -trimpath \
        -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
        "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
)

for b in "${binaries[@]}"; do
    mv -f "${tmp}/${b}" "${bin}/${b}"
done
echo "${want}" > "${stamp}"
step "done: ${binaries[*]} in ${bin}"
