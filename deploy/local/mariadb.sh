# MariaDB for capy's local stack and tests: `source` this file after lib.sh (it uses
# die, note and as_pg_owner). ensure_mariadb installs the server when it is missing;
# start_local_mariadb starts a private server (never the machine's own on 3306).

# Prints the path of MariaDB program $1 (Debian keeps mariadbd in /usr/sbin).
mariadb_program() {
  local dir
  for dir in /usr/sbin /usr/bin; do
    [ -x "$dir/$1" ] && { echo "$dir/$1"; return 0; }
  done
  command -v "$1" 2>/dev/null
}

# Installs MariaDB's server from Debian's packages when mariadbd is missing. Debian's
# package also enables a system-wide mariadb service on port 3306; capy's own runs
# beside it, on its own port and data folder, so that service is left alone.
ensure_mariadb() {
  mariadb_program mariadbd >/dev/null && mariadb_program mariadb-install-db >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "MariaDB is missing: installing it from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mariadb-server >/dev/null ||
      die "apt-get install mariadb-server failed"
  else
    die "MariaDB's server (mariadbd, mariadb-install-db) is missing: run 'sudo apt-get install mariadb-server'"
  fi
}

# Starts a private MariaDB with its data in folder $1, on 127.0.0.1 port $2, run as the
# PostgreSQL owner (an unprivileged user) when run as root; makes the data folder and
# root's password the first time (kept in $1/root-password). Prints the admin URL on
# stdout. Already running (its pid file names a live process): only prints the URL.
start_local_mariadb() {
  local dir=$1 port=$2 password
  ensure_mariadb
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  if [ ! -d "$dir/data/mysql" ]; then
    note "making a MariaDB data folder in $dir/data"
    (cd "$dir" && as_pg_owner "$(mariadb_program mariadb-install-db)" --no-defaults \
      --datadir="$dir/data" --auth-root-authentication-method=normal --skip-test-db \
      >"$dir/install.log" 2>&1) || die "mariadb-install-db failed; see $dir/install.log"
  fi
  if [ ! -s "$dir/root-password" ]; then
    (umask 077; head -c 18 /dev/urandom | base64 | tr '+/' '-_' >"$dir/root-password")
  fi
  password=$(cat "$dir/root-password")
  (
    umask 077
    for host in localhost 127.0.0.1 ::1; do
      printf "ALTER USER IF EXISTS 'root'@'%s' IDENTIFIED BY '%s';\n" "$host" "$password"
    done >"$dir/init.sql"
  )
  [ "$(id -u)" = 0 ] && chown postgres: "$dir/init.sql"
  if ! { [ -s "$dir/mariadbd.pid" ] && kill -0 "$(cat "$dir/mariadbd.pid")" 2>/dev/null; }; then
    note "starting MariaDB on 127.0.0.1:$port"
    # In the background with every stream closed, so a caller capturing stdout
    # (url=$(start_local_mariadb …)) does not wait for the server to end.
    (
      cd "$dir" || exit 1
      as_pg_owner "$(mariadb_program mariadbd)" --no-defaults \
        --datadir="$dir/data" --socket="$dir/mariadbd.sock" --pid-file="$dir/mariadbd.pid" \
        --log-error="$dir/mariadbd.log" --init-file="$dir/init.sql" --tmpdir="$dir" \
        --port="$port" --bind-address=127.0.0.1 --skip-name-resolve
    ) </dev/null >/dev/null 2>&1 &
    local tries=0
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
      tries=$((tries + 1))
      [ "$tries" -lt 300 ] || die "MariaDB did not start; see $dir/mariadbd.log"
      sleep 0.1
    done
  fi
  echo "mysql://root:$password@127.0.0.1:$port/"
}
