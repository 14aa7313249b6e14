#!/bin/bash
# The roles of compose.yaml's parts image. Secrets come from the environment compose passes on
# (an .env file beside compose.yaml), never from the image.
#   db      PostgreSQL; on first start the people database, owned by people_owner (who runs
#           init-db), and people_app, which may only read and write the tables init-db makes.
#   pooler  PgBouncer in transaction mode (deploy/pgbouncer.ini) in front of db, TLS to clients.
#   proxy   nginx with deploy/nginx-people.conf in front of every replica of the app service.
set -euo pipefail
role=${1:?db, pooler or proxy}

self_signed() {  # a certificate for $1 unless one is mounted there (a real one, in production)
    [ -f "$1.crt" ] || openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
        -subj "/CN=${SERVER_NAME:-localhost}" -keyout "$1.key" -out "$1.crt" 2>/dev/null
}

case $role in
db)
    data=/var/lib/postgresql/data bin=/usr/lib/postgresql/15/bin
    if [ ! -f "$data/.people-ready" ]; then  # written last: a first start cut short starts over
        install -d -o postgres -m 0700 "$data"
        find "$data" -mindepth 1 -delete
        su postgres -c "$bin/initdb -D $data --auth-local=peer --auth-host=scram-sha-256 -U postgres" >/dev/null
        echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
        su postgres -c "$bin/pg_ctl -D $data -o '-c listen_addresses= -c port=5432' -w start" >/dev/null
        # Tables init-db makes later as people_owner are people_app's to read and write: the grants of
        # the README's step 4, given ahead.
        export OWNER_PASSWORD APP_PASSWORD  # read by psql's \getenv: no quoting on a command line
        su postgres -c "$bin/psql -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -p 5432" <<'SQL'
\getenv owner OWNER_PASSWORD
\getenv app APP_PASSWORD
CREATE ROLE people_owner LOGIN PASSWORD :'owner';
CREATE ROLE people_app LOGIN PASSWORD :'app';
CREATE DATABASE people OWNER people_owner;
-- What init-db sets, set before any session opens: PgBouncer keeps server sessions that opened
-- before init-db, and a service that finds no timeout there tries to set it and may not.
ALTER DATABASE people SET statement_timeout = 5000;
\c people
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT CREATE, USAGE ON SCHEMA public TO people_owner;
GRANT USAGE ON SCHEMA public TO people_app;
ALTER DEFAULT PRIVILEGES FOR ROLE people_owner IN SCHEMA public
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO people_app;
ALTER DEFAULT PRIVILEGES FOR ROLE people_owner IN SCHEMA public GRANT SELECT ON SEQUENCES TO people_app;
SQL
        su postgres -c "$bin/pg_ctl -D $data -m fast -w stop" >/dev/null
        touch "$data/.people-ready"
    fi
    exec su postgres -c "exec $bin/postgres -D $data -c listen_addresses='*'"
    ;;
pooler)
    work=/run/pgbouncer
    install -d -o postgres "$work"
    cd "$work"
    self_signed "$work/pooler"
    printf '"people_app" "%s"\n' "$APP_PASSWORD" > userlist.txt  # PgBouncer logs in to db with it too
    sed -e 's/^people = host=127.0.0.1 /people = host=db /' \
        -e "s|^unix_socket_dir = .*|unix_socket_dir =|" -e "s|^logfile = .*|logfile =|" \
        -e "s|^pidfile = .*|pidfile =|" -e "s|^auth_file = .*|auth_file = $work/userlist.txt|" \
        -e "s|^client_tls_key_file = .*|client_tls_key_file = $work/pooler.key|" \
        -e "s|^client_tls_cert_file = .*|client_tls_cert_file = $work/pooler.crt|" \
        /opt/people/pgbouncer.ini > pgbouncer.ini
    chown postgres userlist.txt pooler.key pgbouncer.ini
    exec su postgres -c "exec pgbouncer $work/pgbouncer.ini"
    ;;
proxy)
    work=/run/people-nginx
    install -d "$work/logs" /etc/people
    self_signed /etc/people/tls
    # The site as install.sh and make stack render it, in front of the app service's replicas: the
    # name resolves to every replica when nginx starts.
    sed -e "s|@RATE@|${RATE:-200}|; s|@BURST@|${BURST:-400}|; s|@CLIENT_TIMEOUT@|${CLIENT_TIMEOUT:-10s}|" \
        -e "s|@HTTP_PORT@|80|; s|@HTTPS_PORT@|443|; s|@SERVER_NAME@|${SERVER_NAME:-localhost}|" \
        -e "s|@CERT@|/etc/people/tls.crt|; s|@KEY@|/etc/people/tls.key|; s|@ACCESS_LOG@|/dev/stdout|" \
        -e "s|@UPSTREAM_SERVERS@|    server app:8000 max_fails=1 fail_timeout=2s;|" \
        /opt/people/nginx-people.conf > "$work/site.conf"
    if grep -o '@[A-Z_]*@' "$work/site.conf"; then echo 'unrendered placeholders above' >&2; exit 1; fi
    cat > "$work/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so;
worker_processes auto;
worker_rlimit_nofile 16384;
pid $work/nginx.pid;
error_log stderr warn;
events { worker_connections 8192; }
http {
    more_clear_headers Server;
    server_tokens off;
    default_type application/octet-stream;
    include $work/site.conf;
}
CONF
    exec nginx -p "$work" -c "$work/nginx.conf" -g 'daemon off;'
    ;;
*)
    echo "unknown role $role: db, pooler or proxy" >&2
    exit 2
    ;;
esac
