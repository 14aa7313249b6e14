#!/usr/bin/env bash
# Install the people service on a fresh Debian or Ubuntu VM, or bring an existing install up to
# date: run it again at any time. As root, from a checkout:  sudo deploy/install.sh [--monitoring] [SERVER_NAME]
#   --monitoring Prometheus, Alertmanager and the blackbox exporter too, wired to the service (docs/operations.md)
#   SERVER_NAME  the host name nginx answers to (default: this machine's FQDN)
#   CERT, KEY    a certificate and key to use; without them a self-signed pair is made once
set -euo pipefail

MONITORING=0
[ "${1:-}" = --monitoring ] && { MONITORING=1; shift; }
SERVER_NAME=${1:-$(hostname -f)}
SRC=$(cd "$(dirname "$0")/.." && pwd)
APP=/opt/people
ETC=/etc/people
say() { printf 'install: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "install: run as root (sudo $0)" >&2; exit 1; }

say "system packages"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# libnginx-mod-http-headers-more-filter: so that no header names the software (Server).
# postgresql-client: pg_dump and pg_restore, for backups of a PostgreSQL database
apt-get install -y -q --no-install-recommends nginx libnginx-mod-http-headers-more-filter openssl python3 python3-venv \
  python3-dev gcc libev-dev postgresql-client >/dev/null

say "users people (the service) and people-backup (its backups)"
id people >/dev/null 2>&1 || useradd --system --home-dir /nonexistent --shell /usr/sbin/nologin people
# The backups' own identity, in the service's group: it reads the SQLite file; the service cannot write
# what it writes (people-backup.service says how).
id people-backup >/dev/null 2>&1 \
  || useradd --system --no-user-group --gid people --home-dir /nonexistent --shell /usr/sbin/nologin people-backup
# The units make these too; made here so that the modes hold on an upgrade (systemd keeps an existing
# directory's mode) and the service finds the backups' directory from its first start. The SQLite
# database is made here, group-writable for the backup (SQLite would make it 0644 less the umask);
# earlier installs left it 0600.
install -d -o people -g people -m 0770 /var/lib/people
[ -e /var/lib/people/people.db ] || install -o people -g people -m 0660 /dev/null /var/lib/people/people.db
find /var/lib/people -maxdepth 1 \( -name people.db -o -name 'people.db-*' \) -exec chmod g+rw {} +
install -d -o people-backup -g people -m 0750 /var/lib/people-backups
[ -d /var/lib/people/backups ] && say "backups now go to /var/lib/people-backups: those in" \
  "/var/lib/people/backups were the service's to change, so remove them once a new one is there"

say "code in $APP (from $SRC)"
install -d -m 0755 "$APP"
cp "$SRC"/*.py "$SRC"/schema.sql "$APP"/  # the application is the top-level modules
# Debian's own Python, which the service's user can run (not one under a person's home).
"$APP/.venv/bin/python" -c 'import sys; sys.exit(sys.base_prefix != "/usr")' 2>/dev/null \
  || { rm -rf "$APP/.venv"; /usr/bin/python3 -m venv "$APP/.venv"; }
# Every file pip installs must have a hash listed in requirements-runtime.txt. pip checks none of what it
# fetches to build a source distribution (bjoern), so that is built with the venv's setuptools
# (--no-build-isolation; --use-pep517 whatever pip's age), installed first from the same list.
requirements="$SRC/deploy/requirements-runtime.txt"
sed -n '/^setuptools==/,/[^\\]$/p' "$requirements" | "$APP/.venv/bin/pip" install -q --require-hashes -r /dev/stdin
"$APP/.venv/bin/pip" install -q --require-hashes --no-build-isolation --use-pep517 -r "$requirements"

say "configuration in $ETC"
install -d -m 0750 -g people "$ETC"
if [ ! -f "$ETC/people.env" ]; then
  # Settings that differ from the unit's defaults, and secrets, go here (read by systemd only).
  cat > "$ETC/people.env" <<EOF
# DATABASE_URL=postgresql://people_app:PASSWORD@db.example:5432/people
# WORKERS=2
# PEOPLE_ALLOW=203.0.113.0/24
EOF
  chown root:people "$ETC/people.env"
  chmod 0640 "$ETC/people.env"
  say "wrote $ETC/people.env (SQLite in /var/lib/people until DATABASE_URL is set)"
fi
if [ -n "${CERT:-}" ] && [ -n "${KEY:-}" ]; then
  install -m 0644 "$CERT" "$ETC/tls.crt"
  install -m 0600 "$KEY" "$ETC/tls.key"
  say "installed the given certificate"
elif [ ! -f "$ETC/tls.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
    -subj "/CN=$SERVER_NAME" -addext "subjectAltName=DNS:$SERVER_NAME" \
    -keyout "$ETC/tls.key" -out "$ETC/tls.crt" 2>/dev/null
  chmod 0600 "$ETC/tls.key"
  say "made a self-signed certificate for $SERVER_NAME: replace $ETC/tls.crt and tls.key with real ones"
fi

install -m 0755 "$SRC/deploy/people-admin" /usr/local/bin/people-admin
install -m 0755 "$SRC/deploy/people-backup" "$APP/people-backup"

# The socket and nginx's upstream follow PORT when people.env moves the service (default 8000).
PORT=$(sed -n 's/^[[:space:]]*PORT=["'"'"']\{0,1\}\([0-9][0-9]*\).*/\1/p' "$ETC/people.env" | tail -n 1)
PORT=${PORT:-8000}
say "systemd units: the service, its socket, and its daily backup"
# A changed unit needs a restart; otherwise new code is a reload, which refuses no connection.
cmp -s "$SRC/deploy/people.service" /etc/systemd/system/people.service && ship=reload-or-restart || ship=restart
for unit in people.service people.socket people-backup.service people-backup.timer; do
  install -m 0644 "$SRC/deploy/$unit" "/etc/systemd/system/$unit"
done
sed -i "s|^ListenStream=127.0.0.1:8000$|ListenStream=127.0.0.1:$PORT|" /etc/systemd/system/people.socket
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable -q people.socket people people-backup.timer
  # The socket's first start: the service (an earlier install's) still holds the port itself.
  systemctl is-active -q people.socket || { systemctl stop people; systemctl start people.socket; }
  systemctl "$ship" people
  systemctl start people-backup.timer
  systemctl start --no-block people-backup.service  # a first backup now, not in a day
else
  say "systemd is not running here (a container?): the units are installed, not started"
fi

say "nginx site for $SERVER_NAME, in front of 127.0.0.1:$PORT"
sed -e "s|@RATE@|200|; s|@BURST@|400|; s|@CLIENT_TIMEOUT@|10s|" \
    -e "s|@HTTP_PORT@|80|g; s|@HTTPS_PORT@|443|g; s|@HTTPS_PORT_SUFFIX@||; s|@SERVER_NAME@|$SERVER_NAME|g" \
    -e "s|@CERT@|$ETC/tls.crt|g; s|@KEY@|$ETC/tls.key|g; s|@ACCESS_LOG@|/var/log/nginx/people.access.log|" \
    -e "s|^@UPSTREAM_SERVERS@|    server 127.0.0.1:$PORT max_fails=1 fail_timeout=2s;|" \
    "$SRC/deploy/nginx-people.conf" > /etc/nginx/sites-available/people
ln -sf /etc/nginx/sites-available/people /etc/nginx/sites-enabled/people
rm -f /etc/nginx/sites-enabled/default
grep -q '^\s*server_tokens off' /etc/nginx/nginx.conf || sed -i 's/^\(\s*\)# *server_tokens off;/\1server_tokens off;/' /etc/nginx/nginx.conf
# Debian loads the module from modules-enabled; conf.d is read inside the http block.
echo 'more_clear_headers Server;' > /etc/nginx/conf.d/people-headers.conf
# Room for slow clients (the site limits each address): 8192 connections a worker, two descriptors each.
sed -i 's/^\(\s*worker_connections\s\+\)[0-9]\+;/\18192;/' /etc/nginx/nginx.conf
grep -q '^\s*worker_rlimit_nofile' /etc/nginx/nginx.conf \
  || sed -i 's/^\(\s*worker_processes.*\)$/\1\nworker_rlimit_nofile 16384;/' /etc/nginx/nginx.conf
nginx -t -q
if [ -d /run/systemd/system ]; then
  systemctl reload-or-restart nginx
else
  say "nginx configuration tested, not reloaded (no systemd)"
fi

if [ "$MONITORING" = 1 ]; then
  say "monitoring: Prometheus, Alertmanager and the blackbox exporter (loopback only; see docs/operations.md)"
  apt-get install -y -q --no-install-recommends prometheus prometheus-alertmanager prometheus-blackbox-exporter >/dev/null
  P=/etc/prometheus
  sed -e "s|https://people.example/readyz|https://$SERVER_NAME/readyz|" -e "s|127.0.0.1:8000|127.0.0.1:$PORT|" \
      "$SRC/deploy/prometheus.yml" > "$P/prometheus.yml"
  install -m 0644 "$SRC/deploy/alerts.yml" "$P/alerts.yml"
  cp "$SRC/deploy/blackbox.yml" "$P/blackbox.yml"
  # A self-signed certificate (made above) is one the probe can only trust as itself.
  if openssl x509 -in "$ETC/tls.crt" -noout -issuer -subject | sed 's/^[a-z]*=//' | uniq | [ "$(wc -l)" = 1 ]; then
    install -m 0644 "$ETC/tls.crt" "$P/people-tls.crt"
    sed -i "s|insecure_skip_verify: false|insecure_skip_verify: false\n        ca_file: $P/people-tls.crt|" "$P/blackbox.yml"
  fi
  # The receiver is the operator's to fill in: Debian's example is replaced once, an edited copy kept.
  grep -q 'receiver: operators' "$P/alertmanager.yml" 2>/dev/null || install -m 0644 "$SRC/deploy/alertmanager.yml" "$P/"
  echo 'ARGS="--web.listen-address=127.0.0.1:9090"' > /etc/default/prometheus
  echo 'ARGS="--web.listen-address=127.0.0.1:9093 --cluster.listen-address="' > /etc/default/prometheus-alertmanager
  echo "ARGS=\"--config.file $P/blackbox.yml --web.listen-address=127.0.0.1:9115\"" > /etc/default/prometheus-blackbox-exporter
  install -d -m 0755 /usr/local/share/people
  cp -r "$SRC/deploy/grafana" /usr/local/share/people/
  promtool check config "$P/prometheus.yml" >/dev/null
  amtool check-config "$P/alertmanager.yml" >/dev/null
  if [ -d /run/systemd/system ]; then
    systemctl enable -q prometheus prometheus-alertmanager prometheus-blackbox-exporter
    systemctl restart prometheus prometheus-alertmanager prometheus-blackbox-exporter
  fi
  say "alerts go to the webhook in $P/alertmanager.yml: fill in yours (or email), then systemctl reload prometheus-alertmanager"
  say "dashboard: Grafana (not in Debian) with /usr/local/share/people/grafana/provisioning; see docs/operations.md"
fi

say "done: https://$SERVER_NAME/ ; check it from here with:"
say "  curl --resolve $SERVER_NAME:443:127.0.0.1 -k https://$SERVER_NAME/readyz"
say "make a token with: sudo people-admin token create --name NAME --scope read"
