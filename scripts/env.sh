# Sourced by scripts/quickstart and scripts/test: a virtual environment in .venv with xapid
# installed (editable) plus the extras named in $XAPID_EXTRAS.  Works on a fresh Debian
# machine, where the system Python refuses `pip install` outside a venv (PEP 668).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}
command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "xapid needs Python 3.11 or newer (found $(python3 --version 2>&1))" >&2; exit 2; }
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv 2>/dev/null || { apt_install python3-venv; rm -rf .venv; python3 -m venv .venv; }
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${XAPID_EXTRAS:-}"
