#!/usr/bin/env bash
# Renders a loadtest HTML report in headless Chromium and checks a picture came out:
# the page must stand alone (no script, no fetch) and draw in a real browser.
# Installs Debian's chromium if it is missing (needs root or sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
  echo "installing chromium (Debian package)" >&2
  ${SUDO:-$( [ "$(id -u)" -eq 0 ] || echo sudo )} apt-get install -y -q chromium >/dev/null
  browser=$(command -v chromium)
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cargo build --release -q -p loadtest
./target/release/loadtest --sessions 8 --rate 2000 --duration 3s --chaos-interval 200ms \
  --baseline --replay 0 --quiet --html "$out/report.html" >/dev/null
timeout 60 "$browser" --headless --no-sandbox --disable-gpu --window-size=1000,2000 \
  --screenshot="$out/report.png" "file://$out/report.html" >/dev/null 2>&1
size=$(stat -c %s "$out/report.png")
# A blank 1000x2000 page compresses to a few kB; two charts and a table do not.
if [ "$size" -lt 30000 ]; then
  echo "the report rendered nearly blank ($size bytes of PNG)" >&2
  exit 1
fi
cp "$out/report.png" "${1:-target/report.png}"
echo "report rendered: ${1:-target/report.png} ($size bytes)"
