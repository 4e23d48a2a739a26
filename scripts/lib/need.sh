# shellcheck shell=bash
# Sourced by the packaging scripts. `need COMMAND APT-PACKAGE`: returns when COMMAND is on
# PATH; otherwise installs APT-PACKAGE (root with apt only; `apt-get update` only when the
# first attempt fails, so a warm machine does no network round trip) or exits with a message.
need() {
    command -v "$1" >/dev/null 2>&1 && return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing $2 (for $1)" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >&2; }
    fi
    command -v "$1" >/dev/null 2>&1 || { echo "$1 not found: install the $2 package" >&2; exit 1; }
}
