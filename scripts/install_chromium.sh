#!/usr/bin/env bash
# Debian's Chromium for the chat-page browser test (Playwright drives it; its own browser download
# cannot reach the network here). Installs only when missing and only where apt-get can run as root;
# never fails the command it is part of: without a browser, tests/serve/test_page.py skips (and fails
# under CI=true, where a browser is required).
set -uo pipefail
if [ -n "${LORAKIT_CHROMIUM:-}" ] && [ -x "${LORAKIT_CHROMIUM}" ]; then
  exit 0
fi
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
  exit 0
fi
outcome="tests/serve/test_page.py will be skipped (under CI=true it fails)"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_chromium: no chromium and no root apt-get; $outcome" >&2
  echo "  (install chromium, or set LORAKIT_CHROMIUM=/path/to/chromium)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends chromium >/dev/null \
   && command -v chromium >/dev/null 2>&1; then
  echo "install_chromium: installed $(chromium --version 2>/dev/null)"
else
  echo "install_chromium: apt-get could not install chromium; $outcome" >&2
fi
exit 0
