#!/usr/bin/env bash
# Install nginx (Debian's nginx-light) for tests/test_data_remote.py, which serves shards over HTTP with it on
# 127.0.0.1 (moto_server comes with the dev extra). Idempotent; it never fails the CI run: without root or apt the
# nginx tests skip and say why. The tests start and stop nginx themselves (tests/object_servers.py).
set -u
export PATH="$PATH:/usr/sbin:/sbin"
say() { echo "setup_servers: $*"; }

if command -v nginx >/dev/null 2>&1; then
    say "nginx already installed"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root: skipping (the nginx tests will skip)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "no apt-get: cannot install nginx (the nginx tests will skip)"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q nginx-light >/dev/null 2>&1; then
    apt-get update -q >/dev/null 2>&1
    apt-get install -y -q nginx-light >/dev/null 2>&1 || apt-get install -y -q nginx >/dev/null 2>&1 \
        || { say "apt-get could not install nginx (the nginx tests will skip)"; exit 0; }
fi
# Debian starts the packaged service; the tests run their own instance on a free port.
command -v systemctl >/dev/null 2>&1 && systemctl disable --now nginx >/dev/null 2>&1
say "nginx installed: $(nginx -v 2>&1)"
exit 0
