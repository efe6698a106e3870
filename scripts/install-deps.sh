#!/usr/bin/env bash
# Installs the Debian packages dbops needs for the demo and the tests, only when missing.
set -euo pipefail
PKGS=(postgresql-15 postgresql-contrib python3-venv podman runc uidmap pgbouncer openssh-server openssh-client pgbackrest
      pg-auto-failover-cli postgresql-15-auto-failover)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
exit 0
