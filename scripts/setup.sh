#!/usr/bin/env bash
# Install everything natter needs into .venv/ (and, as root on Debian, the system tools
# that the tests use). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v iptables >/dev/null 2>&1 || need_apt+=(iptables)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v conntrack >/dev/null 2>&1 || need_apt+=(conntrack)
command -v socat >/dev/null 2>&1 || need_apt+=(socat)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v dockerd >/dev/null 2>&1 || need_apt+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
[[ -x /usr/sbin/sshd ]] || need_apt+=(openssh-server)  # ssh through forwards, ProxyCommand
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v redis-benchmark >/dev/null 2>&1 || need_apt+=(redis-tools)  # bench/latency.py
[[ -x /usr/bin/tinyproxy ]] || need_apt+=(tinyproxy)  # an HTTP CONNECT proxy in the NAT lab
command -v dig >/dev/null 2>&1 || need_apt+=(bind9-dnsutils)  # DNS through a UDP forward
[[ -x /usr/sbin/dnsmasq ]] || need_apt+=(dnsmasq-base)  # the DNS server on the peer's side
command -v iperf3 >/dev/null 2>&1 || need_apt+=(iperf3)  # UDP rate and loss (bench)
command -v nc.openbsd >/dev/null 2>&1 || need_apt+=(netcat-openbsd)  # ssh ProxyCommand via SOCKS
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)  # promtool checks the alert rules
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]} (not root or no apt-get); the tests that need them will skip" >&2
  fi
fi

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || { echo "setup: natter needs Python 3.11 or newer" >&2; exit 1; }
[[ -x .venv/bin/python ]] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q \
  -e libs/natter-proto -e services/broker -e services/client-agent -e '.[dev]'
# the native QUIC engine (libs/natter-quic), where a Rust toolchain is installed
if command -v cargo >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q 'maturin>=1.5,<2'
  (cd libs/natter-quic && VIRTUAL_ENV="$PWD/../../.venv" ../../.venv/bin/maturin develop --release -q) \
    || { echo "setup: building the native engine failed" >&2; exit 1; }
  native="native engine built"
else
  native="no cargo: the native engine is not built, natter runs on qh3"
fi
echo "setup: ready ($(.venv/bin/natter --version); $native)"
