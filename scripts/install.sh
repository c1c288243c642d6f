#!/usr/bin/env bash
# Idempotent set-up of everything kipfix needs on Debian 12, as root: Debian
# packages, kernel headers for BCC, and the project venv (.venv).
#   scripts/install.sh          what the agent and the demo need
#   scripts/install.sh --test   also what the whole test suite needs: image build
#                               tools, Prometheus, the collectors (nfdump, pmacct;
#                               goflow2 built from its Go module into
#                               ~/.cache/kipfix-collectors) and the Kubernetes
#                               binaries of the e2e tests (built from Go modules,
#                               cached in ~/.cache/kipfix-e2e; needs Go >= 1.24)
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
with_tests=0
[ "${1:-}" = "--test" ] && with_tests=1

log() { printf '[install] %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "install.sh must run as root (BPF, tc and apt need it)" >&2; exit 1; }

debs=(
  python3 python3-venv python3-pip python3-bpfcc libbpfcc   # BCC is only packaged for Debian's python
  python3-dev gcc libc6-dev                                   # the C data-record encoder (setup.py)
  iproute2 iputils-ping iperf3 ethtool procps                 # namespaces, veths, traffic in tests
  linux-headers-amd64                                         # fallback kernel headers for BCC
  openssl ca-certificates                                     # test CA for the TLS transport
)
if [ "$with_tests" = 1 ]; then
  debs+=(
    tshark                                                    # independent IPFIX decoder in tests (and dumpcap)
    nfdump pmacct                                             # the collectors users run: nfcapd, nfacctd
    prometheus                                                # real Prometheus and promtool for the metrics tests
    debootstrap buildah runc                                  # build and run the container image in tests
    containerd containernetworking-plugins                    # the e2e real node (tests/e2e/realnode.py)
    util-linux                                                # nsenter (and gcc for its static pause program)
  )
fi
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages already installed"
fi

bash "$repo/scripts/kernel-headers.sh"

venv="$repo/.venv"
if [ ! -x "$venv/bin/python" ]; then
  log "creating venv $venv (system site packages, for Debian's BCC module)"
  # -I: the repository root must not be on sys.path (its operator/ folder is kipfix.operator).
  /usr/bin/python3 -I -m venv --system-site-packages "$venv"
fi
# Re-install when the packaging or the package layout changes (the editable finder maps folders),
# or the C encoder's source does (an editable install builds it once, in place).
layout=$( { cat pyproject.toml setup.py agent/export/ipfix/*.c; find agent bpf operator -name '__init__.py' | sort; } |
  sha256sum | cut -c1-16)
stamp="$venv/.installed-$layout"
if [ ! -f "$stamp" ]; then
  log "installing kipfix and its Python dependencies into the venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel
  "$venv/bin/pip" install -q -e "$repo[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
else
  log "venv up to date"
fi
"$venv/bin/python" -c 'import bcc, pyroute2, kipfix.agent, kipfix.agent.export.ipfix._flowpack' ||
  { echo "venv check failed" >&2; exit 1; }
if [ "$with_tests" = 1 ]; then
  bash "$repo/tests/e2e/build-tools.sh"
  bash "$repo/tests/interop/build-goflow2.sh"                 # goflow2 collector, ~/.cache/kipfix-collectors
fi
log "done: $("$venv/bin/kipfix" --version)"
