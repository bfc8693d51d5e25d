#!/usr/bin/env bash
# Installs what tests/test_ohif.py needs, idempotently (a second run does nothing and takes well under a second):
#   - apt: orthanc-dicomweb (the DICOMweb plugin 1.7 for Orthanc 1.10) and chromium (headless, software WebGL)
#   - npm, into $OHIF_DIR (default: .ohif/ at the repository root, to be git-ignored):
#       @ohif/app: only the built viewer it ships in dist/. The tarball is fetched with `npm pack` (checked
#         against the registry's integrity hash) and unpacked to $OHIF_DIR/ohif-app-<version>/; its runtime
#         dependencies are not installed, the dist is self-contained.
#       playwright-core: drives the system chromium; it downloads no browser. Needs Node.js >= 20.
# Pinned versions. Needs root for apt (skipped when the packages are there) and the npm registry.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OHIF_DIR="${OHIF_DIR:-$ROOT/.ohif}"
OHIF_APP_VERSION="3.13.2"  # tests/test_ohif.py: OHIF_VERSION
PLAYWRIGHT_CORE_VERSION="1.65.1"

need_apt=()
dpkg -s orthanc-dicomweb >/dev/null 2>&1 || need_apt+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "tests/ohif/setup.sh: node and npm (Node.js >= 20) are needed" >&2
  exit 1
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "tests/ohif/setup.sh: playwright-core $PLAYWRIGHT_CORE_VERSION needs Node.js >= 20, found $(node --version)" >&2
  exit 1
fi

mkdir -p "$OHIF_DIR"
APP="$OHIF_DIR/ohif-app-$OHIF_APP_VERSION"
if [ ! -f "$APP/dist/index.html" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_APP_VERSION" >/dev/null)
  mkdir -p "$tmp/x"
  tar -xzf "$tmp/ohif-app-$OHIF_APP_VERSION.tgz" -C "$tmp/x"
  rm -rf "$APP"
  mv "$tmp/x/package" "$APP"
fi

installed_playwright() {
  node -e "try { process.stdout.write(require('$OHIF_DIR/node_modules/playwright-core/package.json').version) } catch (e) {}"
}
if [ "$(installed_playwright)" != "$PLAYWRIGHT_CORE_VERSION" ]; then
  [ -f "$OHIF_DIR/package.json" ] || echo '{"name": "dicom-ai-node-ohif-test", "private": true}' > "$OHIF_DIR/package.json"
  (cd "$OHIF_DIR" && npm install --silent --no-audit --no-fund --save-exact "playwright-core@$PLAYWRIGHT_CORE_VERSION")
fi
echo "OHIF test dependencies ready in $OHIF_DIR (@ohif/app $OHIF_APP_VERSION, playwright-core $PLAYWRIGHT_CORE_VERSION)"
