# Shared set-up of scripts/serve and scripts/test, meant to be sourced.
# Makes the virtual environment and installs the project into it; as root, also
# installs the Debian packages that the caller names.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RESIZE_PROXY_VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

say() { printf 'resize-proxy: %s\n' "$*" >&2; }

# Install the named Debian packages that are missing, when running as root.
install_debian_packages() {
    local missing=()
    local package
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ "$(id -u)" -ne 0 ]]; then
        say "not root, so not installing Debian packages: ${missing[*]}; tests that need them fall back or skip"
        return 0
    fi
    say "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Make the virtual environment and install the project with the given extras,
# again only when pyproject.toml changed since the last install.
install_project() {
    local extras="${1:-}"
    local target="$REPO"
    [[ -n "$extras" ]] && target="$REPO[$extras]"
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating the virtual environment in $VENV"
        if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
            install_debian_packages python3-venv
            rm -rf "$VENV"
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    local stamp="$VENV/.resize-proxy-installed"
    local wanted
    wanted="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1) $extras"
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]]; then
        say "installing Python packages into $VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        "$VENV/bin/python" -m pip install --quiet --editable "$target"
        printf '%s' "$wanted" > "$stamp"
    fi
}
