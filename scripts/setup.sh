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
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Print the comma-separated extras of all arguments, sorted and without duplicates.
merge_extras() {
    printf '%s\n' "$@" | tr ',' '\n' | sed '/^$/d' | sort -u | paste -sd, -
}

# Make the virtual environment and install the project with the given
# comma-separated extras. The stamp file records the pyproject.toml digest and the
# extras installed. Nothing is installed when the digest is unchanged and those
# extras include the requested ones, so after `install_project test` the call
# `install_project ""` of scripts/serve installs nothing.
install_project() {
    local extras
    extras="$(merge_extras "${1:-}")"
    if [[ ! -x "$VENV/bin/python" ]]; then
        say "creating the virtual environment in $VENV"
        if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
            install_debian_packages python3-venv
            rm -rf "$VENV"
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    local stamp="$VENV/.resize-proxy-installed"
    local digest installed_digest="" installed_extras=""
    digest="$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)"
    if [[ -f "$stamp" ]]; then
        { read -r installed_digest && read -r installed_extras; } < "$stamp" || true
    fi
    if [[ "$installed_digest" == "$digest" ]]; then
        installed_extras="$(merge_extras "$installed_extras")"
        [[ "$(merge_extras "$installed_extras" "$extras")" == "$installed_extras" ]] && return 0
        # Keep the extras already installed, so the next caller does not reinstall them.
        extras="$(merge_extras "$installed_extras" "$extras")"
    fi
    local target="$REPO"
    [[ -n "$extras" ]] && target="$REPO[$extras]"
    say "installing Python packages${extras:+ with extras $extras} into $VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --editable "$target"
    printf '%s\n%s\n' "$digest" "$extras" > "$stamp"
}
