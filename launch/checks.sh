# Sourced by the launch scripts: what a launcher would reject in a traceback or a page of usage, named in one
# line (`SCRIPT: NAME=VALUE: ...`, exit 2) before anything starts.

# check_int NAME MIN MAX WHAT: the variable NAME holds a whole number from MIN to MAX (MAX empty: no bound).
check_int() {
    local value=${!1} max=${3:-999999999} range="from $2 to $3"
    [[ -n "$3" ]] || range="of at least $2"
    if [[ ! "$value" =~ ^[0-9]{1,9}$ ]] || (( 10#$value < $2 || 10#$value > max )); then
        echo "${0##*/}: $1=$value: expected a whole number $range ($4)" >&2
        exit 2
    fi
}

# check_host NAME WHAT: the variable NAME holds a host name, an IPv4 address or an IPv6 address (bare or in
# brackets), without a port, that resolves here. torchrun would end in a ValueError traceback on 'bad host', hang
# resolving 'host:port' (it reads 'a:b' as an IPv6 address), and retry a name that does not resolve until its
# rendezvous times out, in pages of C++ frames.
check_host() {
    local problem
    problem=$(host_problem "${!1}") || { echo "${0##*/}: $1=${!1}: $problem ($2)" >&2; exit 2; }
}

# host_problem HOST: prints what is wrong with HOST and fails; silent and true for a well-formed name or address
# that resolves. A name is looked up as ssh and torch look it up (getaddrinfo: /etc/hosts, then DNS), for at most
# RESOLVE_TIMEOUT seconds; without getent (not Linux) it is left to the launcher.
RESOLVE_TIMEOUT=10
host_problem() {
    local label='[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?'
    local ipv6='^\[?[0-9A-Fa-f.]*(:[0-9A-Fa-f.]*){2,8}\]?$' bare=${1#[}
    if [[ ! "$1" =~ ^$label(\.$label)*$ && ! "$1" =~ $ipv6 ]]; then
        echo "expected a host name or an IP address, without a port"
        return 1
    fi
    command -v getent > /dev/null || return 0
    if ! timeout "$RESOLVE_TIMEOUT" getent ahosts "${bare%]}" > /dev/null; then
        echo "does not resolve to an address here (not in /etc/hosts, nor in DNS within ${RESOLVE_TIMEOUT} s)"
        return 1
    fi
}

# check_config PYTHON RANKS ARGS...: `megagpt train ARGS --check-ranks RANKS`, so that a mistake in the config or
# its overrides is megagpt's one line, once, before any rank starts (every rank would meet it, and the launcher
# would add its own failure summary).
check_config() {
    local python=$1 ranks=$2
    shift 2
    "$python" -m megagpt train "$@" --check-ranks "$ranks" || exit $?
}
