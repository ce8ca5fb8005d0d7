#!/usr/bin/env bash
# Set-up of `make test-e2e`: Debian's Chromium (and a font, so a page's text renders) for the headless
# browser test of the dashboard, installed once with apt-get (needs root). Nothing when it is there.
set -euo pipefail
for exe in /usr/bin/chromium chromium chromium-browser; do
  if command -v "$exe" >/dev/null 2>&1; then exit 0; fi
done
if [[ $(id -u) -ne 0 ]]; then
  echo "setup_browser: Chromium is missing and installing it needs root: apt-get install -y chromium fonts-dejavu-core" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get -o DPkg::Lock::Timeout=600 update -q
apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends chromium fonts-dejavu-core
