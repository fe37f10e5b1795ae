#!/usr/bin/env bash
# What the console's browser test needs (idempotent): Debian's Chromium, and playwright-core
# (pinned by tests/console/package-lock.json) under .flywheel/toolchains/browser to drive it
# over the DevTools protocol. playwright-core downloads no browser of its own.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  echo "setup: installing chromium"
  SUDO=""; if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
dir=.flywheel/toolchains/browser
if ! cmp -s tests/console/package-lock.json "$dir/package-lock.json" || [ ! -d "$dir/node_modules/playwright-core" ]; then
  mkdir -p "$dir"
  cp tests/console/package.json tests/console/package-lock.json "$dir/"
  npm ci --prefix "$dir" --no-audit --no-fund --silent
fi
