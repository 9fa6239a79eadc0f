# Shared by deploy/local/up and deploy/local/test: find or install what capy needs.

die() { printf 'error: %s\n' "$*" >&2; exit 1; }
note() { printf '==> %s\n' "$*" >&2; }

# cargo, or a clear message.
require_rust() {
  command -v cargo >/dev/null 2>&1 ||
    die "cargo is missing: install Rust (https://rustup.rs), then run this again"
}

# Prints the folder with initdb/pg_ctl/postgres: $CAPY_PG_BINDIR, else the newest
# Debian /usr/lib/postgresql/*/bin, else PATH.
pg_bindir() {
  if [ -n "${CAPY_PG_BINDIR:-}" ]; then
    [ -x "$CAPY_PG_BINDIR/initdb" ] && { echo "$CAPY_PG_BINDIR"; return 0; }
    return 1
  fi
  local dir
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  dir=$(dirname "$(command -v initdb 2>/dev/null)" 2>/dev/null)
  if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then echo "$dir"; return 0; fi
  return 1
}

# Installs PostgreSQL's server from Debian's packages when it is missing.
ensure_postgres() {
  pg_bindir >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "PostgreSQL's server is missing: installing it from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null ||
      die "apt-get install postgresql failed"
    pg_bindir >/dev/null || die "postgresql is installed but initdb was not found; set CAPY_PG_BINDIR"
  else
    die "PostgreSQL's server binaries (initdb, postgres) are missing: run 'sudo apt-get install postgresql', or set CAPY_PG_BINDIR to the folder holding them"
  fi
}

# PostgreSQL refuses to run as root: as root, run its tools as the postgres user.
as_pg_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# Prints PgBouncer's path: $CAPY_PGBOUNCER, else Debian's /usr/sbin/pgbouncer, else PATH.
pgbouncer_bin() {
  if [ -n "${CAPY_PGBOUNCER:-}" ]; then
    [ -x "$CAPY_PGBOUNCER" ] && { echo "$CAPY_PGBOUNCER"; return 0; }
    return 1
  fi
  [ -x /usr/sbin/pgbouncer ] && { echo /usr/sbin/pgbouncer; return 0; }
  command -v pgbouncer 2>/dev/null
}

# Installs PgBouncer (the pooled endpoint) from Debian's packages when it is missing.
# Debian's package also enables a system-wide pgbouncer service on port 6432; capy's
# own runs beside it, on its own port and config, so that service is left alone.
ensure_pgbouncer() {
  pgbouncer_bin >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "PgBouncer is missing: installing it from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null ||
      die "apt-get install pgbouncer failed"
    pgbouncer_bin >/dev/null || die "pgbouncer is installed but was not found; set CAPY_PGBOUNCER"
  else
    die "PgBouncer is missing: run 'sudo apt-get install pgbouncer', or set CAPY_PGBOUNCER to its path"
  fi
}
