#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real, only when missing.
set -euo pipefail
needed=()
for spec in "$@"; do needed+=("$spec"); done
if [ ${#needed[@]} -eq 0 ]; then
  exit 0
fi
missing=()
for pkg in "${needed[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "Installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
