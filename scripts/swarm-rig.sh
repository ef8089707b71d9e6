#!/usr/bin/env bash
# The multi-node Docker Swarm test rig: three Docker engines on this machine, each in a network
# namespace of its own with its own address on a private bridge, forming one real swarm (ms1 the
# manager, ms2 and ms3 workers). See docs/swarm-rig.md.
#
#   scripts/swarm-rig.sh start [IMAGE...]  start what is not running, form the swarm, make every
#                                          node active, load the images on every node
#   scripts/swarm-rig.sh status            what runs, what answers, the nodes as the manager sees them
#   scripts/swarm-rig.sh kill N            kill node N's dockerd with SIGKILL (a crashed node;
#                                          `start` brings it back and it rejoins)
#   scripts/swarm-rig.sh stop              leave the swarm, stop the engines, remove the namespaces,
#                                          the bridge and the iptables rule (images and data kept)
#
# IMAGE: images of the default engine to load on every node (docker save | docker load, so that
# every node has the same image ID); without any, every microscaler-replica:* image of the default
# engine. The manager's engine: unix:///var/run/docker-ms1.sock.
#
# Every subcommand is idempotent and takes a lock (two runs at once wait for each other). Must
# run as root. Only this machine's own namespaces are ever dialled (10.222.0.0/24 on br-ms). The
# host's network namespace, its docker0 and the default engine are never touched: each private
# engine is started inside its own namespace (checked before it may run), never in the host's.
set -euo pipefail

RIG_DIR=${MICROSCALER_SWARM_RIG_DIR:-/var/lib/microscaler-ci/swarm-rig}
LOGS=$RIG_DIR/logs
NODES=(1 2 3)
BRIDGE=br-ms
BRIDGE_ADDR=10.222.0.1
PREFIX=24
WAIT=${MICROSCALER_SWARM_RIG_WAIT:-60}

say() { echo "swarm-rig: $*"; }
fail() {
  echo "swarm-rig: FAILED: $*" >&2
  exit 1
}
now() { date +%s; }

[ "$(id -u)" = 0 ] || fail "must run as root (namespaces, a bridge, iptables and dockerd)"

ns() { echo "ms$1"; }
addr() { echo "10.222.0.$(($1 + 1))"; }
sock() { echo "/var/run/docker-ms$1.sock"; }
pidfile() { echo "/var/run/docker-ms$1.pid"; }
log_of() { echo "$LOGS/ms$1.log"; }
# The docker CLI on node N's engine; bounded, so that a hung engine cannot hang the rig.
dk() {
  local n=$1
  shift
  timeout 60 docker -H "unix://$(sock "$n")" "$@"
}
answers() { timeout 10 docker -H "unix://$(sock "$1")" version >/dev/null 2>&1; }
# Whether process $1 lives (a zombie does not).
alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }
# Whether process $1's command line mentions $2. A pid file left by a killed engine may name a
# pid the system has since given to another process (the default engine, say): nothing is
# waited for or killed by pid unless the process is the rig's own.
cmd_has() { [ -n "$1" ] && tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF -- "$2"; }
pid_of() {
  local p
  p=$(cat "$(pidfile "$1")" 2>/dev/null || true)
  if alive "$p" && cmd_has "$p" "docker-ms$1"; then echo "$p"; fi
}

show_log() {
  local log
  log=$(log_of "$1")
  if [ -s "$log" ]; then
    echo "---- the end of $log ----" >&2
    tail -n "${2:-25}" "$log" >&2
    echo "---- (full log: $log) ----" >&2
  else
    echo "(its log $log is empty or missing)" >&2
  fi
}

take_lock() {
  mkdir -p "$RIG_DIR" "$LOGS"
  exec 9>"$RIG_DIR/.lock"
  if ! flock -n 9; then
    say "another swarm-rig.sh holds $RIG_DIR/.lock; waiting for it"
    flock -w 900 9 || fail "could not take $RIG_DIR/.lock within 15 min"
  fi
}

ensure_tools() {
  local need=()
  command -v docker >/dev/null 2>&1 || need+=(docker.io)
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
  if [ ${#need[@]} -gt 0 ]; then
    say "apt-get install ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
}

# ---------------------------------------------------------------------------------------------
# network

# Bridged frames pass through iptables here, where the default engine's FORWARD policy drops
# them: let the bridge talk to itself (DOCKER-USER when the default engine made it, else FORWARD).
fw_chain() {
  if iptables -n -L DOCKER-USER >/dev/null 2>&1; then echo DOCKER-USER; else echo FORWARD; fi
}
rule=(-i "$BRIDGE" -o "$BRIDGE" -j ACCEPT)

ensure_network() {
  if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
    ip link add "$BRIDGE" type bridge
    ip addr add "$BRIDGE_ADDR/$PREFIX" dev "$BRIDGE"
    say "bridge $BRIDGE $BRIDGE_ADDR/$PREFIX: created"
  fi
  ip link set "$BRIDGE" up
  local chain
  chain=$(fw_chain)
  iptables -C "$chain" "${rule[@]}" 2>/dev/null || iptables -I "$chain" "${rule[@]}"
  local n
  for n in "${NODES[@]}"; do
    local name host_end ns_end
    name=$(ns "$n")
    host_end="$name-h"
    ns_end="$name-n"
    [ -e "/var/run/netns/$name" ] || ip netns add "$name"
    if ! ip -n "$name" link show "$ns_end" >/dev/null 2>&1; then
      ip link del "$host_end" 2>/dev/null || true
      ip link add "$host_end" type veth peer name "$ns_end"
      ip link set "$ns_end" netns "$name"
      ip -n "$name" addr add "$(addr "$n")/$PREFIX" dev "$ns_end"
      say "namespace $name: $(addr "$n")/$PREFIX on $BRIDGE"
    fi
    ip link set "$host_end" master "$BRIDGE" up
    ip -n "$name" link set lo up
    ip -n "$name" link set "$ns_end" up
  done
}

# ---------------------------------------------------------------------------------------------
# engines

start_engine() {
  local n=$1 name pid
  name=$(ns "$n")
  if answers "$n"; then return; fi
  pid=$(pid_of "$n")
  if [ -z "$pid" ]; then
    # A dockerd killed earlier leaves its pid file behind, and a new one then refuses to start;
    # and its containerd's, whose process dies with it but may linger a moment as a zombie: a
    # new dockerd that finds it "still running" waits for it until it gives up. Its containers
    # run on (their shims outlive it); the new engine takes them up again and stops them.
    rm -f "$(pidfile "$n")"
    stop_pid "/var/run/docker-$name/containerd/containerd.pid" 10 "docker-$name"
    rm -f "/var/run/docker-$name/containerd/containerd.pid"
    [ -e "/var/run/netns/$name" ] || fail "namespace $name is missing: not starting its engine (it must never run in the host's namespace)"
    mkdir -p "/var/lib/docker-$name" "/var/run/docker-$name"
    echo "==== $(date -u +%FT%TZ) starting dockerd of $name" >>"$(log_of "$n")"
    # Only the network (and host name) namespaces are switched, so the cgroup mounts stay
    # visible (`ip netns exec` remounts /sys and dockerd then fails: "Devices cgroup isn't
    # mounted"). unshare and nsenter exec: the pid is dockerd's. It must not inherit the lock.
    nohup unshare --uts sh -c "hostname $name && exec nsenter --net=/var/run/netns/$name dockerd \
      --data-root /var/lib/docker-$name --exec-root /var/run/docker-$name \
      -H unix://$(sock "$n") --pidfile $(pidfile "$n") \
      --bridge=none --iptables=false --ip-masq=false" >>"$(log_of "$n")" 2>&1 </dev/null 9>&- &
    pid=$!
    # Never let a private engine run in the host's network namespace.
    sleep 0.2
    local host_net its_net
    host_net=$(readlink /proc/self/ns/net)
    its_net=$(readlink "/proc/$pid/ns/net" 2>/dev/null || true)
    if [ "$its_net" = "$host_net" ]; then
      kill -9 "$pid" 2>/dev/null || true
      fail "dockerd of $name runs in the host's network namespace; killed it"
    fi
    say "engine $name: started (pid $pid, $(sock "$n"), log: $(log_of "$n"))"
  else
    say "engine $name: pid $pid is running but does not answer yet; waiting"
  fi
  local t0
  t0=$(now)
  until answers "$n"; do
    if [ -n "$pid" ] && ! alive "$pid"; then
      show_log "$n"
      fail "dockerd of $name exited while starting"
    fi
    if [ $(($(now) - t0)) -ge "$WAIT" ]; then
      show_log "$n"
      fail "dockerd of $name did not answer on $(sock "$n") within $WAIT s"
    fi
    sleep 0.5
  done
  say "engine $name: ready ($(($(now) - t0)) s)"
}

swarm_state() { dk "$1" info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown; }
node_id() { dk "$1" info --format '{{.Swarm.NodeID}}' 2>/dev/null || true; }

ensure_manager() {
  local state control
  state=$(swarm_state 1)
  control=$(dk 1 info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null || true)
  if [ "$state" = active ] && [ "$control" = true ]; then return; fi
  if [ "$state" != inactive ]; then
    say "ms1 is in swarm state $state (manager: $control): leaving it"
    dk 1 swarm leave --force >/dev/null 2>&1 || true
  fi
  dk 1 swarm init --advertise-addr "$(addr 1)" --listen-addr "$(addr 1):2377" >/dev/null ||
    { show_log 1; fail "docker swarm init on ms1 failed"; }
  say "swarm: initialised on ms1 ($(addr 1):2377)"
}

ensure_worker() {
  local n=$1 state id t0
  t0=$(now)
  state=$(swarm_state "$n")
  id=$(node_id "$n")
  if [ -n "$id" ] && dk 1 node inspect "$id" >/dev/null 2>&1; then
    # A node of this swarm, restarted, reconnects on its own: give it a moment.
    while [ "$state" = pending ] && [ $(($(now) - t0)) -lt 30 ]; do
      sleep 1
      state=$(swarm_state "$n")
    done
    [ "$state" = active ] && return
  fi
  if [ "$state" != inactive ]; then
    say "ms$n is in swarm state $state, not a node of ms1's swarm: leaving it"
    dk "$n" swarm leave --force >/dev/null 2>&1 || true
  fi
  local token
  token=$(dk 1 swarm join-token -q worker) || fail "reading the worker join token on ms1 failed"
  dk "$n" swarm join --token "$token" --advertise-addr "$(addr "$n")" --listen-addr "$(addr "$n"):2377" \
    "$(addr 1):2377" >/dev/null ||
    { show_log "$n"; fail "ms$n could not join the swarm at $(addr 1):2377 (is the iptables rule '${rule[*]}' in $(fw_chain)?)"; }
  say "swarm: ms$n joined as a worker"
}

# Waits until the manager sees every engine's node Ready and active; removes nodes of no engine
# (a node that left and joined again has a new ID, the old one stays Down).
ensure_nodes() {
  local ids=() n t0
  for n in "${NODES[@]}"; do ids+=("$(node_id "$n")"); done
  for n in "${NODES[@]}"; do
    local id=${ids[$((n - 1))]}
    [ -n "$id" ] || fail "ms$n reports no swarm node ID"
    if [ "$(dk 1 node inspect -f '{{.Spec.Availability}}' "$id" 2>/dev/null)" != active ]; then
      dk 1 node update --availability active "$id" >/dev/null
      say "node ms$n: made active again"
    fi
  done
  local stale
  stale=$(dk 1 node ls -q | grep -v -x -F -f <(printf '%s\n' "${ids[@]}") || true)
  for id in $stale; do
    dk 1 node rm --force "$id" >/dev/null 2>&1 && say "node $id: removed (no engine of the rig has it)"
  done
  t0=$(now)
  while :; do
    local ready=0
    for id in "${ids[@]}"; do
      [ "$(dk 1 node inspect -f '{{.Status.State}}' "$id" 2>/dev/null)" = ready ] && ready=$((ready + 1))
    done
    [ "$ready" = "${#NODES[@]}" ] && break
    if [ $(($(now) - t0)) -ge "$WAIT" ]; then
      dk 1 node ls >&2 || true
      fail "only $ready of ${#NODES[@]} nodes Ready within $WAIT s"
    fi
    sleep 0.5
  done
}

load_images() {
  local images=("$@")
  if [ ${#images[@]} -eq 0 ]; then
    if ! timeout 10 docker version >/dev/null 2>&1; then
      say "images: the default engine does not answer; none loaded"
      return
    fi
    mapfile -t images < <(docker images --format '{{.Repository}}:{{.Tag}}' microscaler-replica)
  fi
  [ ${#images[@]} -gt 0 ] || { say "images: no microscaler-replica image on the default engine yet; none loaded"; return; }
  local img id n
  for img in "${images[@]}"; do
    id=$(docker image inspect -f '{{.Id}}' "$img" 2>/dev/null) || fail "image $img is not on the default engine"
    for n in "${NODES[@]}"; do
      if [ "$(dk "$n" image inspect -f '{{.Id}}' "$img" 2>/dev/null)" = "$id" ]; then continue; fi
      docker save "$img" | dk "$n" load >/dev/null || fail "loading $img on ms$n failed"
      say "image $img: loaded on ms$n"
    done
  done
}

cmd_start() {
  local t0
  t0=$(now)
  ensure_tools
  ensure_network
  local n
  for n in "${NODES[@]}"; do start_engine "$n"; done
  ensure_manager
  for n in "${NODES[@]:1}"; do ensure_worker "$n"; done
  ensure_nodes
  load_images "$@"
  say "up in $(($(now) - t0)) s: manager unix://$(sock 1), ${#NODES[@]} nodes Ready and active"
}

cmd_kill() {
  local n=${1:-}
  [[ " ${NODES[*]} " == *" $n "* ]] || fail "kill needs a node number (${NODES[*]})"
  local pid
  pid=$(pid_of "$n")
  [ -n "$pid" ] || { say "engine ms$n: not running"; return; }
  kill -9 "$pid"
  local i
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  alive "$pid" && fail "dockerd of ms$n (pid $pid) still runs 10 s after SIGKILL"
  say "engine ms$n: killed (pid $pid); its containers are left running, as a crash leaves them"
}

# Kills the process in pid file $1 (TERM, then KILL after $2 s), if its command line has $3.
stop_pid() {
  local p
  p=$(cat "$1" 2>/dev/null || true)
  alive "$p" || return 0
  cmd_has "$p" "$3" || return 0
  kill "$p" 2>/dev/null || true
  local i
  for ((i = 0; i < $2 * 2; i++)); do
    alive "$p" || return 0
    sleep 0.5
  done
  kill -9 "$p" 2>/dev/null || true
}

# What a killed engine leaves behind once its dockerd and containerd are gone: its containers
# (their shims outlive containerd; found by the exact address of this engine's containerd, and
# killed by pid with the container each runs) and the mounts under its data and exec roots
# (containers' root filesystems, sandboxes' namespaces).
remove_leftovers() {
  local n=$1 address p cmd shims=() m
  address="-address /var/run/docker-ms$n/containerd/containerd.sock"
  for p in /proc/[0-9]*; do
    cmd=$(tr '\0' ' ' 2>/dev/null <"$p/cmdline") || continue
    case "$cmd" in *containerd-shim*"$address "*) shims+=("${p#/proc/}") ;; esac
  done
  for p in "${shims[@]}"; do
    # The container's first process: the rest of its pid namespace goes with it.
    for m in $(ps -o pid= --ppid "$p" 2>/dev/null); do kill -9 "$m" 2>/dev/null || true; done
    kill -9 "$p" 2>/dev/null || true
  done
  [ ${#shims[@]} -eq 0 ] || say "engine ms$n: removed ${#shims[@]} container(s) its crash left running"
  for m in $(awk -v a="/var/lib/docker-ms$n/" -v b="/run/docker-ms$n/" -v c="/var/run/docker-ms$n/" \
    'index($2, a) == 1 || index($2, b) == 1 || index($2, c) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
}

cmd_stop() {
  local n
  # Workers first, the manager last.
  for n in $(printf '%s\n' "${NODES[@]}" | sort -rn); do
    if answers "$n"; then
      # Swarm tasks and their containers go with the swarm.
      dk "$n" swarm leave --force >/dev/null 2>&1 || true
      local ids
      ids=$(dk "$n" ps -aq 2>/dev/null || true)
      [ -z "$ids" ] || dk "$n" rm -f $ids >/dev/null 2>&1 || true
    fi
  done
  for n in "${NODES[@]}"; do
    stop_pid "$(pidfile "$n")" 30 "docker-ms$n"
    # A containerd that outlived its dockerd.
    stop_pid "/var/run/docker-ms$n/containerd/containerd.pid" 10 "docker-ms$n"
    rm -f "$(pidfile "$n")"
    # Out of the swarm, even an engine that could not leave (killed): the next start joins
    # afresh instead of waiting for a swarm that is gone.
    rm -rf "/var/lib/docker-$(ns "$n")/swarm"
    remove_leftovers "$n"
    if [ -e "/var/run/netns/$(ns "$n")" ]; then ip netns del "$(ns "$n")"; fi
    ip link del "$(ns "$n")-h" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  local chain
  for chain in DOCKER-USER FORWARD; do
    while iptables -C "$chain" "${rule[@]}" 2>/dev/null; do iptables -D "$chain" "${rule[@]}"; done
  done
  say "stopped (data under /var/lib/docker-ms{1,2,3} kept; logs in $LOGS)"
}

cmd_status() {
  local n ok=0
  if ip link show "$BRIDGE" >/dev/null 2>&1; then say "bridge $BRIDGE: up"; else say "bridge $BRIDGE: missing"; ok=1; fi
  if iptables -C "$(fw_chain)" "${rule[@]}" 2>/dev/null; then say "iptables: $(fw_chain) accepts $BRIDGE to $BRIDGE"; else say "iptables: no rule for $BRIDGE"; ok=1; fi
  for n in "${NODES[@]}"; do
    local pid state
    pid=$(pid_of "$n")
    if answers "$n"; then
      state=$(swarm_state "$n")
      say "engine ms$n: answers (pid ${pid:-?}, $(sock "$n"), $(addr "$n")), swarm $state"
    else
      say "engine ms$n: down${pid:+ (pid $pid does not answer)}"
      ok=1
    fi
  done
  if answers 1; then dk 1 node ls 2>/dev/null | sed 's/^/swarm-rig:   /' || true; fi
  return $ok
}

case "${1:-}" in
  start)
    shift
    take_lock
    cmd_start "$@"
    ;;
  stop)
    take_lock
    cmd_stop
    ;;
  status) cmd_status ;;
  kill)
    take_lock
    cmd_kill "${2:-}"
    ;;
  -h | --help) sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' ;;
  *)
    echo "usage: $0 start [IMAGE...] | status | kill N | stop  (see --help)" >&2
    exit 2
    ;;
esac
