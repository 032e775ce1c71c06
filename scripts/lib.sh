# Shared by the scripts. Source it, then:
#   need COMMAND PACKAGE (repeat), then install_needed: install the Debian packages missing
#   markdown_table "A|B|C" "a|b|c"...: print a Markdown table (column B in backticks)
apt_updated=""
needed=()

need() {
    command -v "$1" >/dev/null 2>&1 || needed+=("$2")
}

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "$(basename "$0"): need root to install: $*" >&2
        exit 1
    fi
    [ -n "$apt_updated" ] || { apt-get update -qq; apt_updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

install_needed() {
    if [ ${#needed[@]} -gt 0 ]; then
        echo "$(basename "$0"): installing ${needed[*]}"
        apt_install "${needed[@]}"
        needed=()
    fi
}

# markdown_table HEADER ROW...: every argument is cells joined by "|"; the second column holds
# command-line arguments and is set in backticks.
markdown_table() {
    local header="$1" row first rest args
    shift
    echo
    echo "| ${header//|/ | } |"
    echo "|$(sed 's/[^|]*/ --- /g' <<<"$header")|"
    for row in "$@"; do
        first=${row%%|*}
        rest=${row#*|}
        args=${rest%%|*}
        rest=${rest#*|}
        echo "| $first | \`$args\` | ${rest//|/ | } |"
    done
}
