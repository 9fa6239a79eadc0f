# Redis for the local stack and its tests; `source`d by deploy/local/up and
# deploy/local/test after lib.sh (it uses die and note).

# Prints redis-server's path: $CAPY_REDIS_SERVER, else PATH, else Debian's /usr/bin.
redis_server_bin() {
  if [ -n "${CAPY_REDIS_SERVER:-}" ]; then
    [ -x "$CAPY_REDIS_SERVER" ] && { echo "$CAPY_REDIS_SERVER"; return 0; }
    return 1
  fi
  command -v redis-server 2>/dev/null && return 0
  [ -x /usr/bin/redis-server ] && { echo /usr/bin/redis-server; return 0; }
  return 1
}

# Installs redis-server (7.0 or newer) from Debian's packages when it is missing.
# Debian's package also enables a system-wide service on port 6379; capy's own server
# runs beside it, on its own port and config, so that service is left alone.
ensure_redis() {
  redis_server_bin >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "redis-server is missing: installing it from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null ||
      die "apt-get install redis-server failed"
    redis_server_bin >/dev/null || die "redis-server is installed but was not found; set CAPY_REDIS_SERVER"
  else
    die "redis-server is missing: run 'sudo apt-get install redis-server', or set CAPY_REDIS_SERVER to its path"
  fi
}

# Starts a private Redis server for the local stack in folder $1 on 127.0.0.1:$2 (no
# persistence), unless one already runs there, and prints its admin URL on stdout.
# The admin is the ACL user `admin`; `default` is off. The password is kept in
# $1/admin-password and $1/redis.conf (both private), never on a command line. As
# root, the server runs as the postgres user (or nobody), never as root.
start_local_redis() {
  local dir=$1 port=$2 server password owner=""
  server=$(redis_server_bin) || die "redis-server is missing: call ensure_redis first"
  mkdir -p "$dir" || die "cannot make $dir"
  dir=$(cd "$dir" && pwd)
  if [ ! -s "$dir/admin-password" ]; then
    (umask 077; od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$dir/admin-password") ||
      die "cannot write $dir/admin-password"
  fi
  password=$(cat "$dir/admin-password")
  if [ "$(id -u)" = 0 ]; then
    owner=postgres; id -u "$owner" >/dev/null 2>&1 || owner=nobody
  fi
  (
    umask 077
    printf '%s\n' "port $port" "bind 127.0.0.1" "protected-mode yes" "daemonize yes" \
      "pidfile $dir/redis.pid" "logfile $dir/redis.log" "dir $dir" 'save ""' \
      "appendonly no" "user default off" "user admin on >$password ~* &* +@all" \
      > "$dir/redis.conf"
  ) || die "cannot write $dir/redis.conf"
  local url="redis://admin:$password@127.0.0.1:$port"
  if [ -s "$dir/redis.pid" ] && kill -0 "$(cat "$dir/redis.pid")" 2>/dev/null; then
    echo "$url"; return 0
  fi
  if [ -n "$owner" ]; then
    chown -R "$owner" "$dir" || die "cannot chown $dir to $owner"
    runuser -u "$owner" -- "$server" "$dir/redis.conf" || die "redis-server did not start; see $dir/redis.log"
  else
    "$server" "$dir/redis.conf" || die "redis-server did not start; see $dir/redis.log"
  fi
  local tries=0
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    tries=$((tries + 1))
    [ "$tries" -lt 100 ] || die "Redis did not come up on 127.0.0.1:$port; see $dir/redis.log"
    sleep 0.1
  done
  note "Redis runs on 127.0.0.1:$port (folder $dir)"
  echo "$url"
}
