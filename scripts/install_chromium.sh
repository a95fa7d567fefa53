#!/usr/bin/env bash
# Debian's Chromium for the chat-page browser test (Playwright drives it; its own browser download
# cannot reach the network here). Installs only when missing and only where apt-get can run as root.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no chromium and no root apt-get; tests/serve/test_page.py will be skipped" >&2
  echo "  (set LORAKIT_CHROMIUM=/path/to/chromium to use another build)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "install_chromium: installed $(chromium --version 2>/dev/null)"
