# shellcheck shell=bash
# A private Docker engine from Debian's packages, unpacked (not installed) and started by hand
# with its own data-root, exec-root, pidfile and socket under a temporary folder. It runs with
# no bridge and no iptables rules (the check uses host networking), niced so that it does not
# starve the rest of the machine, and engine_stop undoes everything it changed on the host.
#
# Sourced by scripts/container-e2e.sh after debian-apt.sh. Functions:
#   engine_fetch CACHE ROOT   download (cached) and unpack the packages into ROOT
#   engine_start WORK ROOT    start dockerd; exports PATH, DOCKER_HOST, DOCKER_CONFIG
#   engine_stop               stop it and undo its traces (safe to call twice, or early)

# The engine and Compose v2 come from trixie; runc and tini from the host's own suite, because
# trixie's builds need a newer glibc than older hosts have (dockerd and containerd do not).
ENGINE_TRIXIE_PKGS=(docker.io docker-cli containerd docker-compose debootstrap)
ENGINE_HOST_PKGS=(runc tini)
# Host paths the engine creates whatever its data-root: removed again if they were not there.
ENGINE_HOST_TRACES=(/opt/containerd /run/containerd /run/docker /run/runc /etc/docker)

ENGINE_PID=
ENGINE_WORK=
ENGINE_ROOT=
ENGINE_ABSENT_TRACES=()
ENGINE_ABSENT_CGROUPS=()
ENGINE_IP_FORWARD=
ENGINE_HAD_DOCKER0=
ENGINE_CHAINS4=
ENGINE_CHAINS6=

engine_fetch() {
  local cache=$1 root=$2 pkg deb
  local host_suite
  host_suite=$(host_codename)
  for pkg in "${ENGINE_TRIXIE_PKGS[@]}"; do
    apt_private_download "$cache/debs/trixie" "$pkg/trixie"
  done
  for pkg in "${ENGINE_HOST_PKGS[@]}"; do
    apt_private_download "$cache/debs/$host_suite" "$pkg/$host_suite"
  done
  mkdir -p "$root"
  for pkg in "${ENGINE_TRIXIE_PKGS[@]}"; do
    for deb in "$cache/debs/trixie/${pkg}"_*.deb; do dpkg -x "$deb" "$root"; done
  done
  for pkg in "${ENGINE_HOST_PKGS[@]}"; do
    for deb in "$cache/debs/$host_suite/${pkg}"_*.deb; do dpkg -x "$deb" "$root"; done
  done
}

engine_start() {
  ENGINE_WORK=$1
  ENGINE_ROOT=$2
  local path sub
  ENGINE_ABSENT_TRACES=()
  for path in "${ENGINE_HOST_TRACES[@]}"; do
    [ -e "$path" ] || ENGINE_ABSENT_TRACES+=("$path")
  done
  ENGINE_ABSENT_CGROUPS=()
  for sub in /sys/fs/cgroup /sys/fs/cgroup/*/; do
    sub=${sub%/}
    [ -e "$sub/docker" ] || ENGINE_ABSENT_CGROUPS+=("$sub/docker")
  done
  ENGINE_IP_FORWARD=$(cat /proc/sys/net/ipv4/ip_forward 2>/dev/null || true)
  ENGINE_HAD_DOCKER0=
  if ip link show docker0 > /dev/null 2>&1; then ENGINE_HAD_DOCKER0=1; fi
  ENGINE_CHAINS4=
  ENGINE_CHAINS6=
  if command -v iptables > /dev/null; then ENGINE_CHAINS4=$(_engine_chains iptables); fi
  if command -v ip6tables > /dev/null; then ENGINE_CHAINS6=$(_engine_chains ip6tables); fi

  export PATH="$ENGINE_ROOT/usr/sbin:$ENGINE_ROOT/usr/bin:$PATH"
  export DOCKER_HOST="unix://$ENGINE_WORK/docker.sock"
  export DOCKER_CONFIG="$ENGINE_WORK/docker-config"
  mkdir -p "$DOCKER_CONFIG/cli-plugins"
  ln -sf "$ENGINE_ROOT/usr/libexec/docker/cli-plugins/docker-compose" "$DOCKER_CONFIG/cli-plugins/"
  unset DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH

  nice -n 10 dockerd \
    --data-root "$ENGINE_WORK/data" --exec-root "$ENGINE_WORK/exec" \
    --pidfile "$ENGINE_WORK/dockerd.pid" -H "$DOCKER_HOST" \
    --bridge=none --iptables=false --ip6tables=false --ip-forward=false \
    --log-level=warn > "$ENGINE_WORK/dockerd.log" 2>&1 &
  ENGINE_PID=$!
  for _ in $(seq 1 120); do
    if docker info > /dev/null 2>&1; then
      echo "container-e2e: dockerd $(docker version -f '{{.Server.Version}}') running" \
           "(pid $ENGINE_PID, data-root under $ENGINE_WORK)"
      return 0
    fi
    if ! kill -0 "$ENGINE_PID" 2>/dev/null; then
      break
    fi
    sleep 0.5
  done
  echo "container-e2e: dockerd did not start; its log:" >&2
  tail -n 30 "$ENGINE_WORK/dockerd.log" >&2
  return 1
}

# Processes whose executable lies in the unpacked engine: shims outlive dockerd when containers
# are still running, and are reparented away from it.
_engine_own_pids() {
  local p exe
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$exe" in "$ENGINE_ROOT"/*) echo "${p#/proc/}" ;; esac
  done
}

engine_stop() {
  [ -n "$ENGINE_WORK" ] || return 0
  local pid mnt path
  if [ -n "$ENGINE_PID" ] && kill -0 "$ENGINE_PID" 2>/dev/null; then
    local ids
    ids=$(timeout 30 docker ps -aq 2>/dev/null || true)
    if [ -n "$ids" ]; then
      # shellcheck disable=SC2086
      timeout 60 docker rm -f $ids > /dev/null 2>&1 || true
    fi
    kill -TERM "$ENGINE_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do
      kill -0 "$ENGINE_PID" 2>/dev/null || break
      sleep 0.5
    done
    kill -KILL "$ENGINE_PID" 2>/dev/null || true
    wait "$ENGINE_PID" 2>/dev/null || true
  fi
  ENGINE_PID=
  if [ -n "$ENGINE_ROOT" ]; then
    for pid in $(_engine_own_pids); do kill -KILL "$pid" 2>/dev/null || true; done
  fi
  # Mounts left under the work folder (overlay layers, shm), deepest first.
  while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v w="$ENGINE_WORK" 'index($5, w "/") == 1 { print $5 }' /proc/self/mountinfo \
           | sort -r)
  for path in "${ENGINE_ABSENT_TRACES[@]}"; do
    rm -rf "$path"
  done
  for path in "${ENGINE_ABSENT_CGROUPS[@]}"; do
    # cgroup folders go with rmdir, children first.
    [ -d "$path" ] && find "$path" -mindepth 0 -depth -type d -exec rmdir {} + 2>/dev/null
  done
  if [ -z "$ENGINE_HAD_DOCKER0" ] && ip link show docker0 > /dev/null 2>&1; then
    ip link delete docker0 || true
  fi
  if command -v iptables > /dev/null 2>&1; then
    _engine_drop_chains iptables "$ENGINE_CHAINS4"
  fi
  if command -v ip6tables > /dev/null 2>&1; then
    _engine_drop_chains ip6tables "$ENGINE_CHAINS6"
  fi
  if [ -n "$ENGINE_IP_FORWARD" ] \
     && [ "$(cat /proc/sys/net/ipv4/ip_forward)" != "$ENGINE_IP_FORWARD" ]; then
    echo "$ENGINE_IP_FORWARD" > /proc/sys/net/ipv4/ip_forward
  fi
  ENGINE_WORK=
}

# The engine runs with --iptables=false and adds no rules; this is the safety net for one that
# did: DOCKER* chains that were not there before it started, and the jumps to them.
_engine_chains() {
  local tool=$1 table
  for table in filter nat; do
    "$tool" -t "$table" -S 2>/dev/null \
      | awk -v t="$table" '$1 == "-N" && $2 ~ /^DOCKER/ { print t " " $2 }' || true
  done
}

_engine_drop_chains() {
  local tool=$1 before=$2 table chain rule
  while read -r table chain; do
    [ -n "$chain" ] || continue
    grep -qxF "$table $chain" <<< "$before" && continue
    while read -r rule; do
      # shellcheck disable=SC2086
      "$tool" -t "$table" ${rule/#-A/-D} 2>/dev/null || true
    done < <("$tool" -t "$table" -S 2>/dev/null | grep -E -- "-j $chain( |\$)" || true)
    "$tool" -t "$table" -F "$chain" 2>/dev/null || true
  done < <(_engine_chains "$tool")
  while read -r table chain; do
    [ -n "$chain" ] || continue
    grep -qxF "$table $chain" <<< "$before" || "$tool" -t "$table" -X "$chain" 2>/dev/null || true
  done < <(_engine_chains "$tool")
}
