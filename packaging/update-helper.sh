#!/bin/sh
# spotfi-bridge-update: installs a package the bridge downloaded and checked, restarts
# the bridge, and waits for it to connect; if it does not, reinstalls the previous
# package and restarts that, so the router comes back on the version it had.
#
# Started by the bridge (bridge update) in its own session: it outlives the bridge it
# restarts. POSIX sh, runs under busybox ash. Its outcome goes to logread
# (logger -t spotfi-bridge) and to $STATE_DIR/state.json, which bridge info shows.
#
# Usage: spotfi-bridge-update ID PACKAGE PREVIOUS MANAGER OLD_PID TIMEOUT
#   PACKAGE   the checked download (removed when done)
#   PREVIOUS  the package to roll back to (kept: see docs/OPENWRT.md, "Updating")
#   MANAGER   opkg or apk
#   OLD_PID   the bridge that asked: its connected marker does not count
#   TIMEOUT   seconds to wait for the new bridge to connect
# SPOTFI_BRIDGE_ROOT prefixes every system path (tests run in a scratch tree).

ID=$1 PACKAGE=$2 PREVIOUS=$3 MANAGER=$4 OLD_PID=$5 TIMEOUT=$6
ROOT=${SPOTFI_BRIDGE_ROOT:-}
STATE_DIR=$ROOT/etc/spotfi/update
MARKER=$ROOT/var/run/spotfi-bridge.connected
INIT=$ROOT/etc/init.d/spotfi-bridge
RC_COMMON=$ROOT/etc/rc.common
EXT=${PACKAGE##*.}

say() {
	logger -t spotfi-bridge -p daemon.notice "update $ID: $*"
	echo "$(date -u '+%Y-%m-%dT%H:%M:%SZ') update $ID: $*"
}

# one line of JSON text: backslashes, quotes and control characters made safe
json_text() {
	printf '%s' "$1" | tr '\n\t\r' '   ' | sed 's/\\/\\\\/g; s/"/\\"/g'
}

# TEXT: its last non-blank line, without the leading blanks (opkg indents its errors)
last_line() {
	printf '%s\n' "$1" | grep -v '^[[:space:]]*$' | tail -n 1 | sed 's/^[[:space:]]*//'
}

# STATE REASON: the outcome as bridge info shows it (written whole, then renamed)
set_state() {
	printf '{"id": "%s", "state": "%s", "reason": "%s", "updated": %s}\n' \
		"$(json_text "$ID")" "$1" "$(json_text "$2")" "$(date +%s)" > "$STATE_DIR/state.json.tmp" &&
		mv "$STATE_DIR/state.json.tmp" "$STATE_DIR/state.json"
}

# FILE: install it even when that very version is installed already
pkg_install() {
	case "$MANAGER" in
	opkg) opkg install --force-reinstall --force-downgrade "$1" ;;
	# --force-reinstall: OpenWrt's apk from 3.0.5 on; an older one only upgrades or
	# downgrades (the same version again is then a no-op)
	apk) apk add --allow-untrusted $(apk add -h 2>&1 | grep -q -- --force-reinstall &&
		echo --force-reinstall) "$1" ;;
	*) echo "unknown package manager: $MANAGER"; return 1 ;;
	esac
}

restart_service() {
	rm -f "$MARKER"
	/bin/sh "$RC_COMMON" "$INIT" restart
}

# SECONDS: until a bridge other than OLD_PID wrote the marker and is still alive
wait_connected() {
	local waited=0 pid rest
	while [ "$waited" -lt "$1" ]; do
		if [ -f "$MARKER" ] && read -r pid rest < "$MARKER" && [ -n "$pid" ] &&
				[ "$pid" != "$OLD_PID" ] && kill -0 "$pid" 2>/dev/null; then
			return 0
		fi
		sleep 1
		waited=$((waited + 1))
	done
	return 1
}

# FILE: keep it as the package to roll back to next time
keep() {
	[ "$1" = "$STATE_DIR/installed.$EXT" ] && return 0
	cp "$1" "$STATE_DIR/installed.$EXT.tmp" && mv "$STATE_DIR/installed.$EXT.tmp" "$STATE_DIR/installed.$EXT"
}

cleanup() {
	rm -f "$PACKAGE"
	case "$PREVIOUS" in "$STATE_DIR"/*) ;; *) rm -f "$PREVIOUS" ;; esac
}

mkdir -p "$STATE_DIR"
set_state installing ""
say "installing $PACKAGE with $MANAGER (previous package: $PREVIOUS)"
if out=$(pkg_install "$PACKAGE" 2>&1); then
	restart_service
	if wait_connected "$TIMEOUT"; then
		keep "$PACKAGE"
		cleanup
		set_state done "the new bridge connected"
		say "done: the new bridge connected"
		exit 0
	fi
	reason="the new bridge did not connect within $TIMEOUT s"
else
	reason="$MANAGER failed: $(last_line "$out")"
fi

say "$reason: reinstalling the previous package"
set_state rolling-back "$reason"
if out=$(pkg_install "$PREVIOUS" 2>&1); then
	restart_service
	if wait_connected "$TIMEOUT"; then
		keep "$PREVIOUS"
		cleanup
		set_state rolled-back "$reason"
		say "rolled back: the previous bridge connected again"
		exit 0
	fi
	reason="$reason; the previous package did not connect either within $TIMEOUT s"
else
	reason="$reason; reinstalling the previous package failed: $(last_line "$out")"
fi
rm -f "$PACKAGE"
set_state failed "$reason"
say "FAILED: $reason (the previous package is still in $PREVIOUS)"
exit 1
