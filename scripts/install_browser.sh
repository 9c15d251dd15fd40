#!/usr/bin/env bash
# Chromium for the explorer's browser tests (CI). tests/test_explore.py skips them, saying so, where it is missing.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
    || echo "warning: chromium could not be installed; the browser tests of tests/test_explore.py will be skipped" >&2
fi
exit 0
