#!/usr/bin/env bash
# Screenshot a run's report.html with headless Chromium (Debian's chromium package).
#
#   scripts/screenshot_report.sh RUN_DIR/report.html [OUT.png] [WIDTH] [HEIGHT]
#
# OUT defaults to report.screenshot.png beside the HTML. Set CHROMIUM to pick a
# browser binary. When no Chromium is installed it prints "skipped: ..." and
# exits 0, so callers (and CI without a browser) are not broken by its absence.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 4 ]]; then
    echo "usage: $0 REPORT_HTML [OUT_PNG] [WIDTH] [HEIGHT]" >&2
    exit 2
fi
html_file=$1
if [[ ! -f "$html_file" ]]; then
    echo "error: $html_file: no such file" >&2
    exit 1
fi
html_abs=$(cd "$(dirname "$html_file")" && pwd)/$(basename "$html_file")
out=${2:-${html_abs%.html}.screenshot.png}
width=${3:-1600}
height=${4:-2000}

browser=""
for candidate in "${CHROMIUM:-}" chromium chromium-browser google-chrome google-chrome-stable chrome headless_shell; do
    if [[ -n "$candidate" ]] && command -v "$candidate" >/dev/null 2>&1; then
        browser=$(command -v "$candidate")
        break
    fi
done
if [[ -z "$browser" ]]; then
    echo "skipped: no headless Chromium found (install Debian's chromium package, or set CHROMIUM)" >&2
    exit 0
fi

mkdir -p "$(dirname "$out")"
out_abs=$(cd "$(dirname "$out")" && pwd)/$(basename "$out")
# A throwaway profile keeps runs independent; --no-sandbox is needed as root in containers; the rest keeps
# the browser off the network (no QUIC, no background fetches, no component updates, no sync).
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
shot="$profile/screenshot.png"  # written here first: an old file at the output path is replaced only by a new shot
run=("$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
     --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars
     --user-data-dir="$profile" --window-size="${width},${height}" --screenshot="$shot" "file://$html_abs")
if command -v timeout >/dev/null 2>&1; then
    timeout 120 "${run[@]}" >/dev/null 2>&1 || true
else
    "${run[@]}" >/dev/null 2>&1 || true
fi
if [[ ! -s "$shot" ]]; then
    echo "error: $browser wrote no screenshot (for $out_abs)" >&2
    exit 1
fi
mv "$shot" "$out_abs"
echo "$out_abs"
