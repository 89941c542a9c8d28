#!/bin/sh
# envcrate bootstrap script for @NAME@, crate @ID@
# made by envcrate @VERSION@ (envcrate bootstrap); needs no envcrate on the node.
#
#   . ./THIS_SCRIPT                activate the env in this shell (deactivate undoes it)
#   sh THIS_SCRIPT prefix          print the env's prefix
#   sh THIS_SCRIPT run -- CMD ...  run CMD in the env, with its exit status
#
# Caches: $ENVCRATE_CACHE (':'-separated, searched in order), else @CACHES_SHOWN@.
# A crate ready in a cache is used by plain sh (no Python starts). Otherwise
# envcrate's compute side, embedded below, fills the cache under the node's
# Python 3.6 or later (standard library only) with the same layout, locks and
# leases as `envcrate ensure`; the archive's digest is checked before anything
# becomes visible. ENVCRATE_BOOT_DIR: where staged archives are (default: this
# script's directory when known, and the current directory). ENVCRATE_BOOT_PYTHON:
# the Python to run that with (default: the first of the crate's own version,
# python3 and /usr/libexec/platform-python that is 3.6 or later).

_envcrate_boot() {
    if [ -n "${ZSH_VERSION:-}" ]; then
        setopt local_options no_nomatch sh_word_split 2>/dev/null
    fi
    _envcrate_id='@ID@'
    _envcrate_nl='
'
    _envcrate_python=@PYTHON@
    _envcrate_report=@REPORT@
    _envcrate_mode=
    if _envcrate_sourced "$@"; then
        _envcrate_mode=activate
    else
        _envcrate_mode=${1:-}
        [ $# -eq 0 ] || shift
        case $_envcrate_mode in
            prefix) ;;
            run)
                [ "${1:-}" != "--" ] || shift
                if [ $# -eq 0 ]; then
                    echo "envcrate: usage: sh $0 run -- COMMAND [ARG]..." >&2
                    return 2
                fi
                ;;
            -h | --help | help)
                sed -n '2,/^$/s/^# \{0,1\}//p' "$0" | sed 's/THIS_SCRIPT/'"${0##*/}"'/'
                return 0
                ;;
            "" | activate)
                echo "envcrate: to activate the env, source this script: . $0 (or: sh $0 prefix | run -- COMMAND)" >&2
                return 2
                ;;
            *)
                echo "envcrate: unknown mode '$_envcrate_mode': use . $0 (activate), sh $0 prefix, or sh $0 run -- COMMAND" >&2
                return 2
                ;;
        esac
    fi
    _envcrate_caches=${ENVCRATE_CACHE:-@CACHES@}
    [ -n "$_envcrate_caches" ] || _envcrate_caches=${XDG_CACHE_HOME:-${HOME:-/}/.cache}/envcrate
    _envcrate_entry=
    _envcrate_made=
    _envcrate_lease=
    _envcrate_started=
    _envcrate_ef= # this process's event file (its first event names it)
    _envcrate_done_sh=
    if _envcrate_warm; then
        if [ "$_envcrate_mode" = prefix ] || _envcrate_take_lease "$$"; then
            _envcrate_done_sh=HIT
        fi
    elif _envcrate_wait_filler || ! _envcrate_start; then
        if [ "$_envcrate_mode" = prefix ] || _envcrate_take_lease "$$"; then
            _envcrate_done_sh=WAITED
        fi
    fi
    if [ "$_envcrate_done_sh" = HIT ]; then
        _envcrate_event HIT
    elif [ "$_envcrate_done_sh" = WAITED ]; then
        # both once the wait is over (the report counts the process WAITED); a
        # wait that ends in the Python path leaves no row of this shell
        _envcrate_event WAITING
        _envcrate_event READY
    else
        # Python leases this shell's pid itself (run, activate), under the use lock
        _envcrate_cold "$$"
        _envcrate_rc=$?
        if [ -n "$_envcrate_started" ]; then # ours, if no other script has replaced it since
            _envcrate_sp=$$ _envcrate_ss=$_envcrate_st
            _envcrate_unmark
        fi
        [ "$_envcrate_rc" -eq 0 ] || return 1
        _envcrate_lease=$_envcrate_made
    fi
    case $_envcrate_mode in
        prefix)
            printf '%s\n' "$_envcrate_entry"
            ;;
        run)
            . "$_envcrate_entry/.envcrate/activate.sh" || return 1
            exec "$@"
            ;;
        activate)
            # the lease survives this function for deactivate (saved below)
            _envcrate_keep=$_envcrate_lease
            . "$_envcrate_entry/.envcrate/activate.sh" || return 1
            _envcrate_lease=$_envcrate_keep
            ;;
    esac
    return 0
}

# Sourced (activate) or run as a script? bash and zsh say. Other shells have
# the sourcing script (or the shell's own name) in $0: run as a script only
# when $0 is this very script (its second line names this crate).
_envcrate_sourced() {
    if [ -n "${BASH_VERSION:-}" ]; then
        [ "${BASH_SOURCE:-$0}" != "$0" ]
        return
    fi
    if [ -n "${ZSH_VERSION:-}" ]; then
        case ${ZSH_EVAL_CONTEXT:-} in *:file*) return 0 ;; esac
        return 1
    fi
    _envcrate_l2=
    if [ -f "$0" ]; then
        { IFS= read -r _envcrate_l2 && IFS= read -r _envcrate_l2; } <"$0" 2>/dev/null
    fi
    case $_envcrate_l2 in
        "# envcrate bootstrap script for "*", crate @ID@") return 1 ;;
    esac
    return 0
}

# The next cache of the list in _envcrate_r (the rest stays there), made
# absolute, in _envcrate_c; 1 at the end of the list.
_envcrate_next_cache() {
    while [ -n "$_envcrate_r" ]; do
        _envcrate_c=${_envcrate_r%%:*}
        _envcrate_r=${_envcrate_r#*:}
        case $_envcrate_c in
            "") ;;
            /*) return 0 ;;
            *) _envcrate_c=$PWD/$_envcrate_c && return 0 ;;
        esac
    done
    return 1
}

# The warm path: a ready entry of the crate in one of the caches (the first
# lines of its ready marker: the crate id, then the base interpreter, which
# must exist, or be --python). Two that would do in one cache (a member may
# add one beside the real one): the Python path tells which holds the crate.
_envcrate_warm() {
    _envcrate_r="$_envcrate_caches:"
    while _envcrate_next_cache; do
        [ -d "$_envcrate_c/e" ] || continue
        for _envcrate_e in "$_envcrate_c"/e/@ID16@*; do
            _envcrate_m=$_envcrate_e/.envcrate/ready
            [ -f "$_envcrate_m" ] && [ ! -h "$_envcrate_m" ] || continue
            [ -f "$_envcrate_e/.envcrate/activate.sh" ] || continue # filled by an older envcrate
            _envcrate_l1=
            _envcrate_l2=
            { IFS= read -r _envcrate_l1 && IFS= read -r _envcrate_l2; } <"$_envcrate_m" 2>/dev/null || continue
            [ "$_envcrate_l1" = "$_envcrate_id" ] || continue
            if [ -n "$_envcrate_l2" ]; then
                if [ -n "$_envcrate_python" ]; then
                    [ "$_envcrate_l2" = "$_envcrate_python" ] || continue
                else
                    [ -x "$_envcrate_l2" ] || continue
                fi
            fi
            [ -z "$_envcrate_entry" ] || return 1
            _envcrate_entry=$_envcrate_e
        done
        if [ -n "$_envcrate_entry" ]; then
            if [ -f "$_envcrate_c/used/${_envcrate_entry##*/}" ]; then
                touch -c -h "$_envcrate_c/used/${_envcrate_entry##*/}" 2>/dev/null
            fi
            return 0
        fi
    done
    return 1
}

# Another process on this host fills the crate (its holder file names this
# host and a live pid, and its heartbeat is under a minute old): wait for it
# in sh, polling the warm path, rather than start a Python that would wait on
# the lock (hundreds starting at once compete with the filler for the node's
# cores). 1: no such filler, it ended without a ready entry, its heartbeat
# stopped, or ENVCRATE_LOCK_WAIT seconds passed: the Python path then
# decides, under the lock.
_envcrate_wait_filler() {
    _envcrate_host=
    { IFS= read -r _envcrate_host </proc/sys/kernel/hostname; } 2>/dev/null || _envcrate_host=$(uname -n)
    _envcrate_w=${ENVCRATE_LOCK_WAIT:-600}
    case $_envcrate_w in "" | *[!0-9]* | ?????*) _envcrate_w=600 ;; esac
    _envcrate_w=$((_envcrate_w * 5)) # polls, 0.2 s apart (a fork each: 32 waiters at 0.05 s cost the filler a tenth of the node)
    _envcrate_r="$_envcrate_caches:"
    while _envcrate_next_cache; do
        _envcrate_hf=$_envcrate_c/locks/@ID16@.holder
        [ -f "$_envcrate_hf" ] && [ ! -h "$_envcrate_hf" ] || continue
        _envcrate_sh=
        _envcrate_sp=
        { IFS= read -r _envcrate_sh && IFS= read -r _envcrate_sp; } <"$_envcrate_hf" 2>/dev/null || continue
        [ "$_envcrate_sh" = "$_envcrate_host" ] || continue
        case $_envcrate_sp in "" | *[!0-9]*) continue ;; esac
        _envcrate_i=0
        while [ "$_envcrate_w" -gt 0 ] && [ -d "/proc/$_envcrate_sp" ]; do
            if [ $((_envcrate_i % 25)) -eq 0 ]; then # every 5 s: is the heartbeat fresh?
                [ -n "$(find "$_envcrate_hf" -prune -mmin -1 2>/dev/null)" ] || break
            fi
            sleep 0.2 2>/dev/null || sleep 1
            _envcrate_i=$((_envcrate_i + 1))
            _envcrate_w=$((_envcrate_w - 1))
            _envcrate_entry=
            if _envcrate_warm; then
                return 0
            fi
        done
        _envcrate_entry=
        _envcrate_warm
        return
    done
    return 1
}

# Many processes of this user start on this host at once, none finding the
# crate ready: one of them (the first to create the start marker in $TMPDIR,
# naming its pid and that pid's start time) runs Python; the others poll the
# warm path in sh while that process lives, instead of starting a Python each
# that would only wait on the lock (they would compete with the filler for
# the node's cores). 0: run Python (this shell won, or the start marker is
# another's, stale, or unusable); 1: the crate became ready meanwhile.
# (After _envcrate_wait_filler, which sets _envcrate_host and _envcrate_w.)
_envcrate_start() {
    _envcrate_stime "$$" || return 0 # no /proc: no marker
    _envcrate_st=$_envcrate_v
    _envcrate_u= # this user's id, from /proc (id -u would fork, once per waiter)
    while IFS=' 	' read -r _envcrate_k _envcrate_u _envcrate_v; do
        [ "$_envcrate_k" = Uid: ] && break
        _envcrate_u=
    done </proc/self/status 2>/dev/null
    case $_envcrate_u in "" | *[!0-9]*) return 0 ;; esac
    _envcrate_sm=${TMPDIR:-/tmp}/.envcrate-boot.@ID16@.$_envcrate_u
    _envcrate_valid=
    for _envcrate_try in 1 2; do
        # a marker already there is read first (no fork for most waiters);
        # else one is written whole into a new file of our own and linked to
        # the name: a link opens nothing (a FIFO or symlink planted there is
        # never opened) and fails when the name exists
        if [ ! -e "$_envcrate_sm" ] && [ ! -h "$_envcrate_sm" ]; then
            _envcrate_t=$(mktemp "${TMPDIR:-/tmp}/.envcrate-boot.XXXXXXXX" 2>/dev/null) || return 0
            if printf '%s\n%s\n%s\n%s\n' "$_envcrate_host" "$$" "$_envcrate_st" "$_envcrate_caches" \
                >"$_envcrate_t" 2>/dev/null && ln "$_envcrate_t" "$_envcrate_sm" 2>/dev/null; then
                rm -f "$_envcrate_t"
                _envcrate_started=$_envcrate_sm
                return 0
            fi
            rm -f "$_envcrate_t"
        fi
        _envcrate_marker || return 0
        # its process lives (and is not this shell, which an interrupted
        # `. boot.sh` may have left there): wait for it
        if [ "$_envcrate_sp" != "$$" ] && _envcrate_stime "$_envcrate_sp" && [ "$_envcrate_v" = "$_envcrate_ss" ]; then
            _envcrate_valid=1
            break
        fi
        _envcrate_unmark # its process is gone: a new election, once
    done
    [ -n "$_envcrate_valid" ] || return 0
    _envcrate_i=0
    while [ "$_envcrate_w" -gt 0 ] && _envcrate_stime "$_envcrate_sp" && [ "$_envcrate_v" = "$_envcrate_ss" ]; do
        # from 10 s on, the starter's Python must be filling (a fresh holder
        # file in one of the caches), else its shell is doing something else
        if [ "$_envcrate_i" -ge 50 ] && [ $((_envcrate_i % 25)) -eq 0 ] && ! _envcrate_holder_fresh; then
            _envcrate_unmark
            break
        fi
        sleep 0.2 2>/dev/null || sleep 1
        _envcrate_i=$((_envcrate_i + 1))
        _envcrate_w=$((_envcrate_w - 1))
        _envcrate_entry=
        if _envcrate_warm; then
            return 1
        fi
    done
    _envcrate_entry=
    ! _envcrate_warm
}

# The start marker's fields (host, pid, start time, caches) into
# _envcrate_sh, _envcrate_sp, _envcrate_ss, _envcrate_sc; 1 unless it is a
# regular file of this user, for this host and these caches.
_envcrate_marker() {
    [ -f "$_envcrate_sm" ] && [ ! -h "$_envcrate_sm" ] && [ -O "$_envcrate_sm" ] || return 1
    _envcrate_sh= _envcrate_sp= _envcrate_ss= _envcrate_sc=
    { IFS= read -r _envcrate_sh && IFS= read -r _envcrate_sp && IFS= read -r _envcrate_ss &&
        IFS= read -r _envcrate_sc; } <"$_envcrate_sm" 2>/dev/null || return 1
    [ "$_envcrate_sh" = "$_envcrate_host" ] && [ "$_envcrate_sc" = "$_envcrate_caches" ] || return 1
    case $_envcrate_sp in "" | *[!0-9]*) return 1 ;; esac
    return 0
}

# Remove the start marker if it still names the process read before (not
# one another script made since).
_envcrate_unmark() {
    _envcrate_op=$_envcrate_sp _envcrate_os=$_envcrate_ss
    if _envcrate_marker && [ "$_envcrate_sp" = "$_envcrate_op" ] && [ "$_envcrate_ss" = "$_envcrate_os" ]; then
        rm -f "$_envcrate_sm"
    fi
    _envcrate_sp=$_envcrate_op _envcrate_ss=$_envcrate_os
}

# A holder file of the crate in one of the caches with a heartbeat under a minute old.
_envcrate_holder_fresh() {
    _envcrate_r="$_envcrate_caches:"
    while _envcrate_next_cache; do
        _envcrate_hf=$_envcrate_c/locks/@ID16@.holder
        [ -f "$_envcrate_hf" ] && [ ! -h "$_envcrate_hf" ] || continue
        [ -z "$(find "$_envcrate_hf" -prune -mmin -1 2>/dev/null)" ] || return 0
    done
    return 1
}

# The start time of process $1 (field 22 of /proc/$1/stat) in _envcrate_v.
_envcrate_stime() {
    _envcrate_v=
    { IFS= read -r _envcrate_v </proc/"$1"/stat; } 2>/dev/null || return 1
    _envcrate_v=${_envcrate_v##*) } # from field 3 on; no word splitting (IFS is the caller's)
    _envcrate_k=0
    while [ "$_envcrate_k" -lt 19 ]; do
        _envcrate_v=${_envcrate_v#* }
        _envcrate_k=$((_envcrate_k + 1))
    done
    _envcrate_v=${_envcrate_v%% *}
    case $_envcrate_v in "" | *[!0-9]*) return 1 ;; esac
}

# This shell's lease on the entry ($1: the pid it lasts for): made under a
# temporary name (mktemp: a new file) and renamed onto the lease's name (a
# rename opens nothing: a FIFO or symlink a cache member put there is
# replaced, never opened), in a lease directory that is no symlink. gc and rm
# mark the lease directory (.removing) while they decide under the entry's
# use lock, which sh cannot take: marked, or the entry gone, and the lease is
# dropped. 1: the Python path then leases under the lock (also when there is
# no lease directory yet: Python makes it with the cache's modes).
_envcrate_take_lease() {
    _envcrate_c=${_envcrate_entry%/e/*}
    _envcrate_ld=$_envcrate_c/leases/${_envcrate_entry##*/}
    _envcrate_host=
    { IFS= read -r _envcrate_host </proc/sys/kernel/hostname; } 2>/dev/null || _envcrate_host=$(uname -n)
    _envcrate_host=${_envcrate_host%%.*}
    _envcrate_b=
    { IFS= read -r _envcrate_b </proc/sys/kernel/random/boot_id; } 2>/dev/null
    case $_envcrate_b in
        ????????-????-*) _envcrate_b=${_envcrate_b%%-*}${_envcrate_b#*-} && _envcrate_b=${_envcrate_b%%-*} ;;
        *) _envcrate_b=noboot ;; # as envcrate's own leases say
    esac
    [ -d "$_envcrate_ld" ] && [ ! -h "$_envcrate_ld" ] || return 1
    _envcrate_lease=$_envcrate_ld/${_envcrate_host:-host}.$_envcrate_b.$1
    _envcrate_t=$(mktemp "$_envcrate_ld/.lease.XXXXXXXX" 2>/dev/null) &&
        chmod 644 "$_envcrate_t" 2>/dev/null && mv -f "$_envcrate_t" "$_envcrate_lease" 2>/dev/null
    if [ $? -ne 0 ]; then
        [ -z "$_envcrate_t" ] || rm -f "$_envcrate_t" 2>/dev/null
        echo "envcrate: warning: cannot lease $_envcrate_entry: the cache's owner may remove it while it is in use" >&2
        _envcrate_lease=
        return 0
    fi
    if [ -e "$_envcrate_ld/.removing" ] || [ -h "$_envcrate_ld/.removing" ] ||
        [ ! -f "$_envcrate_entry/.envcrate/ready" ]; then
        rm -f "$_envcrate_lease" 2>/dev/null
        _envcrate_lease=
        return 1
    fi
    return 0
}

# A HIT event for --report (a directory: one line appended to this process's
# file; an s3:// report goes through Python, which signs the upload).
_envcrate_event() {
    [ -n "$_envcrate_report" ] || return 0
    case $_envcrate_report in
        s3://*)
            _ENVCRATE_ENTRY=$_envcrate_entry _envcrate_run_python event "$1" >/dev/null 2>&1 || true
            return 0
            ;;
        file://*) _envcrate_rd=${_envcrate_report#file://} ;;
        *) _envcrate_rd=$_envcrate_report ;;
    esac
    _envcrate_t=$(date +%s%N 2>/dev/null) || return 0
    case $_envcrate_t in *[!0-9]* | "") return 0 ;; esac
    _envcrate_s=${_envcrate_t%?????????}
    _envcrate_h=
    { IFS= read -r _envcrate_h </proc/sys/kernel/hostname; } 2>/dev/null || _envcrate_h=$(uname -n)
    _envcrate_p=
    case $_envcrate_entry in
        "" | *[\"\\]* | *[![:print:]]*) ;; # none yet, or not written as JSON by sh: left out
        *) _envcrate_p=",\"prefix\":\"$_envcrate_entry\"" ;;
    esac
    case $_envcrate_h in *[\"\\/]* | *[![:print:]]*) _envcrate_h=host ;; esac
    : "${_envcrate_ef:=$_envcrate_h.$$.$_envcrate_t.jsonl}"
    (umask 022 && { [ -d "$_envcrate_rd" ] || mkdir -p "$_envcrate_rd"; } &&
        printf '{"crate":"%s","host":"%s","pid":%s,"seconds":0.0,"state":"%s","ts":%s.%s%s%s}\n' \
            "$_envcrate_id" "$_envcrate_h" "$$" "$1" "$_envcrate_s" "${_envcrate_t#"$_envcrate_s"}" \
            "$_envcrate_p" "${2:-}" \
            >>"$_envcrate_rd/$_envcrate_ef") 2>/dev/null || true
}

# The cold path: envcrate's compute side under the first Python 3.6+ found
# (3: that interpreter is older; try the next). It prints the prefix and,
# for activate, this shell's lease, which it made.
_envcrate_cold() {
    _envcrate_out=
    _envcrate_out=$(_envcrate_run_python "$_envcrate_mode" "$1") || return 1
    _envcrate_entry=${_envcrate_out%%"$_envcrate_nl"*}
    _envcrate_made=${_envcrate_out#*"$_envcrate_nl"}
    [ "$_envcrate_made" != "$_envcrate_out" ] || _envcrate_made=
    [ -n "$_envcrate_entry" ]
}

_envcrate_run_python() {
    _envcrate_dir=${ENVCRATE_BOOT_DIR:-}
    if [ -z "$_envcrate_dir" ] && [ -n "${BASH_VERSION:-}" ]; then
        case ${BASH_SOURCE:-} in */*) _envcrate_dir=${BASH_SOURCE%/*} ;; esac
    elif [ -z "$_envcrate_dir" ] && ! _envcrate_sourced; then
        case $0 in */*) _envcrate_dir=${0%/*} ;; esac
    fi
    _envcrate_tried=
    for _envcrate_py in ${ENVCRATE_BOOT_PYTHON:-} $_envcrate_python @PYTHONS@ python3 /usr/libexec/platform-python; do
        case $_envcrate_py in
            /*) [ -x "$_envcrate_py" ] || continue ;;
            *) command -v "$_envcrate_py" >/dev/null 2>&1 || continue ;;
        esac
        _envcrate_tried="$_envcrate_tried $_envcrate_py"
        "$_envcrate_py" -E - "$@" "$_envcrate_caches" "$_envcrate_dir" <<'ENVCRATE_PYTHON_END'
@LOADER@
ENVCRATE_PYTHON_END
        _envcrate_rc=$?
        [ "$_envcrate_rc" -eq 3 ] || return "$_envcrate_rc"
    done
    _envcrate_why="no Python 3.6 or later on this node (tried:${_envcrate_tried:- none found} of $_envcrate_python @PYTHONS@ python3 /usr/libexec/platform-python); install one, or make the script with --python PATH"
    echo "envcrate: error: $_envcrate_why" >&2
    _envcrate_event FAILED ',"error":"no Python 3.6 or later on this node"'
    return 1
}

_envcrate_done() {
    unset -f _envcrate_boot _envcrate_sourced _envcrate_warm _envcrate_take_lease _envcrate_wait_filler _envcrate_start _envcrate_stime _envcrate_event \
        _envcrate_marker _envcrate_unmark _envcrate_holder_fresh _envcrate_next_cache \
        _envcrate_cold _envcrate_run_python _envcrate_done
    unset _envcrate_id _envcrate_nl _envcrate_python _envcrate_report _envcrate_mode \
        _envcrate_caches _envcrate_entry _envcrate_made _envcrate_keep _envcrate_r _envcrate_c \
        _envcrate_e _envcrate_m _envcrate_l1 _envcrate_l2 _envcrate_ld _envcrate_host _envcrate_b \
        _envcrate_rd _envcrate_t _envcrate_s _envcrate_h _envcrate_p _envcrate_out _envcrate_dir \
        _envcrate_tried _envcrate_py _envcrate_rc _envcrate_why _envcrate_w _envcrate_i \
        _envcrate_started _envcrate_st _envcrate_u _envcrate_sm _envcrate_try _envcrate_v _envcrate_k \
        _envcrate_hf _envcrate_sh _envcrate_sp _envcrate_ss _envcrate_sc _envcrate_ef _envcrate_done_sh \
        _envcrate_valid _envcrate_op _envcrate_os
    [ -n "${_envcrate_lease:-}" ] || unset _envcrate_lease
    return "$1"
}

_envcrate_boot "$@"
_envcrate_done "$?"
