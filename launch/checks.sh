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
# brackets), without a port. torchrun would end in a ValueError traceback on 'bad host', and hang resolving
# 'host:port' (it reads 'a:b' as an IPv6 address).
check_host() {
    local value=${!1} label='[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?'
    local ipv6='^\[?[0-9A-Fa-f.]*(:[0-9A-Fa-f.]*){2,8}\]?$'
    if [[ ! "$value" =~ ^$label(\.$label)*$ && ! "$value" =~ $ipv6 ]]; then
        echo "${0##*/}: $1=$value: expected a host name or an IP address, without a port ($2)" >&2
        exit 2
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
