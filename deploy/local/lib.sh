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

# Installs PostgreSQL's server from Debian's packages when it is missing, and its
# client tools: backups run pg_dump and pg_restore.
ensure_postgres() {
  pg_bindir >/dev/null && { ensure_pg_client; return 0; }
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "PostgreSQL's server is missing: installing it from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null ||
      die "apt-get install postgresql failed"
    pg_bindir >/dev/null || die "postgresql is installed but initdb was not found; set CAPY_PG_BINDIR"
  else
    die "PostgreSQL's server binaries (initdb, postgres) are missing: run 'sudo apt-get install postgresql', or set CAPY_PG_BINDIR to the folder holding them"
  fi
  ensure_pg_client
}

# pg_dump and pg_restore (backups, verification, restores), beside the server's
# binaries or on PATH; from Debian's postgresql-client when missing.
has_pg_client() {
  local dir
  dir=$(pg_bindir 2>/dev/null) || dir=""
  if [ -n "$dir" ] && [ -x "$dir/pg_dump" ] && [ -x "$dir/pg_restore" ]; then return 0; fi
  command -v pg_dump >/dev/null 2>&1 && command -v pg_restore >/dev/null 2>&1
}

ensure_pg_client() {
  has_pg_client && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "pg_dump/pg_restore are missing: installing postgresql-client from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-client >/dev/null ||
      die "apt-get install postgresql-client failed"
    has_pg_client || die "postgresql-client is installed but pg_dump was not found"
  else
    die "pg_dump and pg_restore are missing: run 'sudo apt-get install postgresql-client' (the same major as the server or newer)"
  fi
}

# python3 with its venv module: the tests run moto's S3 server from a virtualenv they
# make (capy_testkit::s3). python3-venv from Debian's packages when missing.
ensure_python_venv() {
  local python=${CAPY_PYTHON:-python3}
  "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "python3's venv module is missing: installing python3-venv from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null ||
      die "apt-get install python3-venv failed"
    "$python" -c 'import venv, ensurepip' >/dev/null 2>&1 ||
      die "python3-venv is installed but '$python -c \"import venv, ensurepip\"' still fails; set CAPY_PYTHON to a python3 with venv"
  else
    die "$python with its venv module is missing (the tests' S3 server runs from a virtualenv): run 'sudo apt-get install python3 python3-venv', or set CAPY_PYTHON to a python3 that has it"
  fi
}

# The console's browser tests drive Debian's headless Chromium through chromedriver.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    note "chromium or chromedriver is missing (the console's browser tests): installing chromium and chromium-driver from Debian's packages"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null ||
      die "apt-get install chromium chromium-driver failed"
  else
    die "chromium and chromedriver are missing (the console's browser tests): run 'sudo apt-get install chromium chromium-driver'"
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
