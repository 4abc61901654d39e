#!/bin/bash
# Boot a throw-away systemd container on an overlay of the host's root; tear everything down when it ends.
#
# usage: container.sh STATE_DIR [systemd-nspawn options...]
#   STATE_DIR/seed/    if present, copied over the container's root before it boots
#   STATE_DIR/nspawn.pid, STATE_DIR/console.log    written while it runs
#   STATE_DIR/torn-down                            written last, once everything below is undone
#
# It runs in the foreground until it gets SIGTERM, SIGINT or SIGHUP (or the container powers off); the EXIT
# trap then stops systemd-nspawn, kills what is left in the sub-cgroup, unmounts the overlay and its tmpfs and
# removes the sub-cgroup. The host's root is only ever the overlay's read-only lower layer.
#
# Why a dedicated sub-cgroup: a systemd started from the ROOT cgroup of a host whose PID 1 is not systemd
# takes over the host's cgroups and moves every process of the machine into its own scope.
set -u
state=$(realpath "$1"); shift
rw=$state/rw
merged=$state/merged
cg=neuronserve-test-$$
nspawn=

hierarchies() {
    if [ -e /sys/fs/cgroup/cgroup.controllers ]; then echo /sys/fs/cgroup/$cg; return; fi   # pure cgroup v2
    for h in systemd unified; do [ -d /sys/fs/cgroup/$h ] && echo /sys/fs/cgroup/$h/$cg; done
}

teardown() {
    trap '' INT TERM HUP
    if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
        kill -TERM "$nspawn"            # nspawn asks the container's systemd to power off
        for _ in $(seq 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$nspawn" 2>/dev/null
    fi
    wait 2>/dev/null
    for dir in $(hierarchies); do
        [ -d "$dir" ] || continue
        # only processes this script started can be in there (nspawn and the container's own)
        find "$dir" -name cgroup.procs -exec cat {} + 2>/dev/null | xargs -r kill -KILL 2>/dev/null
    done
    for m in "$merged" "$rw"; do
        mountpoint -q "$m" && { umount "$m" 2>/dev/null || { sleep 1; umount "$m"; } || umount -l "$m"; }
    done
    for dir in $(hierarchies); do
        for _ in $(seq 50); do
            [ -d "$dir" ] || break
            find "$dir" -depth -type d -exec rmdir {} \; 2>/dev/null
            [ -d "$dir" ] && sleep 0.2
        done
    done
    date +%s > "$state/torn-down"
}
trap teardown EXIT
trap 'exit 143' INT TERM HUP

mkdir -p "$rw" "$merged"
mount -t tmpfs -o mode=0755,size=4g neuronserve-test "$rw" || exit 1
mkdir -p "$rw/upper" "$rw/work"
mount -t overlay neuronserve-test -o "lowerdir=/,upperdir=$rw/upper,workdir=$rw/work" "$merged" || exit 1
if [ -d "$state/seed" ]; then cp -a --remove-destination "$state/seed/." "$merged/" || exit 1; fi

# a network of its own: a fresh one, unless the caller gives a namespace it made (a fleet test's host)
net=--private-network
for arg in "$@"; do case $arg in --network-namespace-path=*) net= ;; esac; done

for dir in $(hierarchies); do mkdir -p "$dir" || exit 1; done
(
    for dir in $(hierarchies); do echo "$BASHPID" > "$dir/cgroup.procs" || exit 1; done
    exec systemd-nspawn --quiet -D "$merged" --boot --register=no --keep-unit --console=pipe $net "$@"
) </dev/null >"$state/console.log" 2>&1 &
nspawn=$!
echo "$nspawn" > "$state/nspawn.pid"
wait "$nspawn"
