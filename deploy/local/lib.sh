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

# Makes a private CA and a server certificate for localhost and 127.0.0.1 in folder $1,
# once: ca.crt, ca.key, server.crt, server.key (keys private). Needs openssl.
ensure_tls_certificates() {
  local dir=$1
  [ -s "$dir/ca.crt" ] && [ -s "$dir/server.crt" ] && [ -s "$dir/server.key" ] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl is missing: apt-get install openssl"
  note "making a private CA and a server certificate in $dir"
  mkdir -p "$dir"
  (
    umask 077
    cd "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
      -subj "/CN=capy local CA" -keyout ca.key -out ca.crt \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
      2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
      -keyout server.key -out server.csr 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
      "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
      -extfile server.ext -out server.crt 2>/dev/null
    rm -f server.csr server.ext ca.srl
    chmod 644 ca.crt server.crt
  ) || die "making the TLS certificates in $dir failed"
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
