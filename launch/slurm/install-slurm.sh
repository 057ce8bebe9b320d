#!/usr/bin/env bash
# Install Debian's slurm-wlm (slurmctld + slurmd + client tools) so the test suite can start a real
# Slurm cluster on this machine. Idempotent: does nothing when the daemons and sbatch already exist.
# Needs root (apt-get); otherwise says why and exits non-zero: the Slurm tests then skip, except under
# CI=true, where `make test` stops naming Slurm (Makefile) and the tests fail (tests/conftest.py).
set -euo pipefail

have_all() { command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 && command -v sbatch >/dev/null 2>&1; }
# The daemons live in /usr/sbin, which is not always on a non-root PATH.
export PATH="$PATH:/usr/sbin:/sbin"

if have_all; then
  echo "install-slurm: slurm already installed ($(slurmd -V 2>/dev/null))"
  exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
  echo "install-slurm: slurm-wlm is not installed and installing it needs root (apt-get); run this script as root" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-slurm: slurm-wlm is not installed and apt-get is missing (not a Debian/Ubuntu system); install Slurm by hand" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurm-wlm pulls munge; we run with auth/none, so munge is never started. iproute2 gives `ip netns`.
apt-get install -y -qq --no-install-recommends slurm-wlm slurm-client iproute2 >/dev/null
if ! have_all; then
  echo "install-slurm: apt-get finished but slurmctld/slurmd/sbatch are still missing" >&2
  exit 1
fi
echo "install-slurm: installed $(slurmd -V)"
