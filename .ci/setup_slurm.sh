#!/usr/bin/env bash
# Install what tests/test_slurm.py needs for its local SLURM cluster: Debian's slurmctld, slurmd, slurm-client and
# munge (with its key). Idempotent and quick when they are already there. It never fails the CI run: without root or
# apt the SLURM tests skip and say why. The tests start and stop the daemons themselves (tests/slurm_cluster.py).
set -u

PKGS="slurmctld slurmd slurm-client munge"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "setup_slurm: $*"; }

have_all() {
    local b
    for b in slurmctld slurmd sbatch srun scontrol squeue scancel munged munge unmunge; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

if [ "$(id -u)" != 0 ]; then
    say "not root: skipping (the SLURM tests will skip)"
    exit 0
fi

if have_all; then
    say "SLURM and munge already installed"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get: cannot install $PKGS (the SLURM tests will skip)"
        exit 0
    fi
    # Install only: no service may start (on a systemd machine apt would start slurmd/munge with default configs).
    policy=/usr/sbin/policy-rc.d
    own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    ok=1
    timeout 600 apt-get update -qq || ok=0
    if [ "$ok" = 1 ]; then
        timeout 900 apt-get install -y -qq --no-install-recommends $PKGS >/tmp/setup_slurm_apt.log 2>&1 || ok=0
    fi
    [ "$own_policy" = 1 ] && rm -f "$policy"
    if [ "$ok" != 1 ] || ! have_all; then
        say "could not install $PKGS (see /tmp/setup_slurm_apt.log); the SLURM tests will skip"
        tail -5 /tmp/setup_slurm_apt.log 2>/dev/null
        exit 0
    fi
    say "installed $PKGS"
fi

# The munge package normally creates the key; make one if it did not.
if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge 2>/dev/null || install -d -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key >/dev/null 2>&1 || true
    fi
    [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key 2>/dev/null || true
    chmod 0400 /etc/munge/munge.key
    say "created /etc/munge/munge.key"
fi
exit 0
