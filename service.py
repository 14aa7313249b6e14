"""The people service: configuration, the app factory and the command line (`python service.py --help`);
server.py serves the app on pre-forked bjoern workers."""
import argparse
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import falcon
import peewee

import backups
import models
import security
import storage
import telemetry
from openapi import DOCS, VERSION, Docs, OpenAPI
from resources import PREFIX, Collection, Item, add_error_handlers
from server import OLD_WORKERS, Master
from telemetry import safe_url


TTL = re.compile(r'(\d+)([smhd]?)')
TTL_UNITS = {'': 1, 's': 1, 'm': 60, 'h': 3600, 'd': 86400}


class Config:
    """Settings, read from the environment once, here and nowhere else."""

    def __init__(self, environ=os.environ, **overrides):
        def setting(name, default, kind=str):  # a malformed value is a ValueError naming the variable
            try:
                return kind(environ.get(name, default))
            except (ValueError, argparse.ArgumentTypeError) as error:
                raise ValueError(f'{name}={environ.get(name)!r}: {error}') from None

        self.database_url = setting('DATABASE_URL', 'sqlite:///people.db')
        self.host = setting('HOST', '127.0.0.1')
        self.port = setting('PORT', '8000', port)
        self.workers = setting('WORKERS', 1, at_least(1))
        self.drain_seconds = setting('DRAIN_SECONDS', 5, at_least(0, float))
        self.request_deadline = setting('REQUEST_DEADLINE', 30, at_least(0.001, float))
        self.log_level = setting('LOG_LEVEL', 'info', telemetry.level)
        self.list_scan = setting('LIST_SCAN', models.SCAN_LIMIT, at_least(1))  # rows a filtered page examines
        # Off by default: behind nginx its JSON access log, with the same X-Request-ID, is the
        # record of every request, and a line per request here costs ~7 us (bench/, docs/performance.md).
        self.access_log = environ.get('ACCESS_LOG', 'off') == 'on'
        # Where workers keep their metrics: a RuntimeDirectory under systemd, else a fresh temp dir.
        self.metrics_dir = environ.get('METRICS_DIR') or None
        self.backup_dir = environ.get('BACKUP_DIR') or None  # where the timer's backups go: their age is a metric
        self.metrics_allow = setting('METRICS_ALLOW', security.LOOPBACK, security.networks)
        self.auth = environ.get('PEOPLE_AUTH', 'on') != 'off'  # fail-safe: only an explicit "off" disables it
        self.allow = setting('PEOPLE_ALLOW', '', security.networks)  # empty: every address may try
        self.trusted_proxies = setting('PEOPLE_TRUSTED_PROXIES', '', security.networks)
        self.cors_origins = [o.strip() for o in environ.get('PEOPLE_CORS_ORIGINS', '').split(',') if o.strip()]
        self.__dict__.update(overrides)


def at_least(low, kind=int):
    """A setting's (or an option's) type: a number of `kind`, `low` or more (NaN is not)."""
    def number(text):
        try:
            value = kind(text)
        except ValueError:  # int()'s own words ("invalid literal for int() with base 10") teach nothing
            value = None
        if value is None or not value >= low:
            raise ValueError(f'must be a{" whole" * (kind is int)} number, {low} or more')
        return value
    return number


def create_app(config, watch=None):
    db = storage.open_database(config.database_url)
    people = models.People(db, config.list_scan)
    log = telemetry.JsonLog(config.log_level)
    counts = telemetry.Counts(config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-'), log)
    watch = watch or telemetry.Watch(1)
    middleware = [telemetry.Telemetry(counts, log, config.access_log, watch, people.record_use),
                  security.Guard(config.auth, config.allow, config.trusted_proxies, people.find_token)]
    if config.cors_origins:  # CORS is off unless origins are listed
        middleware.append(falcon.CORSMiddleware(allow_origins=config.cors_origins, expose_headers=['ETag', 'Location']))
    app = falcon.App(media_type='application/json', middleware=middleware)
    app.add_route(PREFIX, Collection(people, counts))
    app.add_route(PREFIX + '{id}', Item(people))
    app.add_route('/openapi.json', OpenAPI())
    docs = Docs()
    app.add_route(DOCS, docs)
    app.add_route(DOCS + '/{asset}', docs, suffix='asset')
    app.add_route('/livez', telemetry.Livez())
    app.add_route('/readyz', telemetry.Readyz(people, watch))
    app.add_route('/metrics', telemetry.Metrics(counts, config.metrics_allow, VERSION, config.backup_dir))
    add_error_handlers(app, people, log, counts)
    return app


def seed(people, count, out=sys.stderr):
    """Insert `count` generated people in batches, with a progress bar (rate, ETA) on a terminal."""
    batch, start = max(10_000, min(500_000, count // 50)), time.monotonic()
    for first in range(1, count + 1, batch):
        done = min(first + batch - 1, count)
        people.seed(first, done)
        if out.isatty():
            rate = done / (time.monotonic() - start)
            print(f'\r[{"#" * (30 * done // count):.<30}] {done}/{count} {rate:,.0f}/s ETA {(count - done) / rate:.0f} s',
                  end='\n' if done == count else '', file=out, flush=True)


def manage_tokens(args):
    if not getattr(args, 'name', '').isprintable():  # e.g. bytes that are not UTF-8, which no database stores
        sys.exit(f'a token name is printable text, not {args.name!r}')
    if args.action == 'create':
        if not 1 <= len(args.name) <= 100:
            sys.exit(f'a token name is 1-100 characters, not {len(args.name)}')
        try:
            secret = models.create_token(args.name, args.scope, args.ttl)
        except peewee.IntegrityError:
            sys.exit(f'a token named {args.name!r} exists or existed (names are never reused): pick another name')
        print(f'token "{args.name}" ({args.scope}) {expiry(time.time() + args.ttl)}; shown only now:', file=sys.stderr)
        print(secret)
    elif args.action == 'list':
        tokens = models.list_tokens()
        for token in tokens:
            state = f"revoked {when(token['revoked_at'])}" if token['revoked_at'] else expiry(token['expires_at'])
            used = f"last used {when(token['last_used_at'])}" if token['last_used_at'] else 'never used'
            print(f"{token['name']}\t{token['scope']}\t{state}\t{used}\t{token['requests']} requests")
        if not tokens:
            print('no tokens; make one with: token create --name NAME --scope read|write', file=sys.stderr)
    elif models.revoke_token(args.name):
        print(f'token {args.name!r} revoked: every worker refuses it within {security.CACHE_SECONDS} s', file=sys.stderr)
    else:
        sys.exit(f'no live token is named {args.name!r} (token list shows the revoked ones)')
    return 0


def expiry(expires_at):
    """'expires 2026-01-31 12:00 UTC (in 30 days)', or 'expired'."""
    left = expires_at - time.time()
    count, unit = next((round(left / size), unit) for size, unit in ((86400, 'day'), (3600, 'hour'), (60, 'minute'),
                                                                      (1, 'second')) if left >= 2 * size or size == 1)
    return 'expired' if left <= 0 else f"expires {when(expires_at)} (in {count} {unit}{'s' * (count != 1)})"


def when(timestamp):
    return time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(timestamp))


def port(text):
    """For --port (and PORT, its default): a TCP port a server can listen on."""
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise argparse.ArgumentTypeError(f'a port is 1-65535, not {text!r}')
    return int(text)


def parse_ttl(text):
    """For --ttl: seconds from '3600', '30m', '12h' or '30d', up to ten years."""
    match = TTL.fullmatch(text.strip())
    seconds = int(match[1]) * TTL_UNITS[match[2]] if match and len(match[1]) < 10 else 0
    if not 0 < seconds <= 3650 * 86400:
        raise argparse.ArgumentTypeError(f'a TTL is seconds, or 30m, 12h, 30d (m, h, d; at most 3650d), not {text!r}')
    return seconds


def refuse_served_port(host, port):
    """Exit with one line when anything listens on host:port already: called before anything is created."""
    # NOTE: workers bind with SO_REUSEPORT, which would let them join a copy of this service already
    # serving the port (the kernel then splits clients between the two, tokens on or off); a bind
    # without it fails while any server listens there, a reuse-port group included.
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart must not wait out TIME_WAIT
        try:
            probe.bind((host, port))
        except OSError as error:
            why = ('is another server running there?' if error.errno == errno.EADDRINUSE else
                   'bjoern serves IPv4 only: give an IPv4 address, or a name that resolves to one')
            sys.exit(f'cannot serve on {host}:{port}: {error.strerror or error}; {why}')


def command_line(config):
    """The commands and their options; defaults come from the environment, through Config."""
    parser = argparse.ArgumentParser(prog='service.py', description='The people REST service.')
    commands = parser.add_subparsers(dest='command', required=True)
    serve_cmd = commands.add_parser('serve', help='serve HTTP on bjoern')
    serve_cmd.add_argument('--host', default=config.host)
    serve_cmd.add_argument('--port', type=port, default=str(config.port))
    serve_cmd.add_argument('--workers', type=at_least(1), default=str(config.workers))
    serve_cmd.add_argument('--check', action='store_true', help='load the code, configuration and database, then '
                           'exit: what a reload (SIGUSR2) runs before it replaces the running code')
    commands.add_parser('init-db', help='create the tables that are missing (never drops data)')
    seed_cmd = commands.add_parser('seed', help='insert generated people into an empty database, for benchmarks and trials')
    seed_cmd.add_argument('--count', type=int, required=True)
    seed_cmd.add_argument('--force', action='store_true', help='add them to the people the database holds')
    commands.add_parser('backup', help='write a consistent snapshot of the database to PATH').add_argument('path')
    restore_cmd = commands.add_parser('restore', help='load a backup into the empty database DATABASE_URL names')
    restore_cmd.add_argument('path')
    restore_cmd.add_argument('--force', action='store_true', help='replace the rows the database holds')
    restore_cmd.add_argument('--keep-tokens', action='store_true', help="keep this database's tokens, not the backup's")
    token_cmd = commands.add_parser('token', help='create, list or revoke API tokens')
    token_actions = token_cmd.add_subparsers(dest='action', required=True)
    create_cmd = token_actions.add_parser('create', help='print a new token (shown once) on the last line')
    create_cmd.add_argument('--name', required=True)
    create_cmd.add_argument('--scope', choices=models.SCOPES, required=True)
    create_cmd.add_argument('--ttl', type=parse_ttl, default='30d', help='seconds, or 30m, 12h, 30d (at most 3650d)')
    token_actions.add_parser('list', help='names, scopes, expiry or revocation, last use and requests; never secrets')
    token_actions.add_parser('revoke', help='refuse a token from now on (it stays listed)').add_argument('name')
    return parser


def database_for(command, url, schema=True):
    """The database DATABASE_URL names, with the tables schema.sql defines (unless not `schema`: backup and
    restore touch nothing before they must), or an exit with one line saying why it cannot be used."""
    try:
        db = storage.open_database(url)
        if isinstance(db, peewee.SqliteDatabase) and db.database in ('', ':memory:'):
            sys.exit(f'{command} failed: {url} is a database in memory, which no other process sees: name a file')
        missing = storage.create_schema(db) if schema else []
    except peewee.ProgrammingError as error:  # the least-privilege role on a database init-db has not set up
        sys.exit(f'{command} failed: {safe_url(url)} is not set up for the service ({backups.first_line(error)}): '
                 f'run "service.py init-db" once as the database owner (README: Deploy with PostgreSQL)')
    except (ValueError, RuntimeError, peewee.PeeweeException) as error:  # not a URL Peewee can use, no server...
        sys.exit(f'{command} failed: cannot open {safe_url(url)}: {backups.first_line(error)}')
    for statement in missing:  # the least-privilege role cannot add indexes: serve anyway, and say so
        print(f'{command}: index missing, filtered lists are slow until the table owner runs: {statement}',
              file=sys.stderr)
    return db


def main(argv=None):
    try:
        config = Config()
    except ValueError as error:
        sys.exit(f'a setting in the environment is malformed: {error}')
    args = command_line(config).parse_args(argv)

    if args.command in ('backup', 'restore'):
        db = database_for(args.command, config.database_url, schema=False)
        try:
            done = ([backups.take(db, args.path)] if args.command == 'backup' else
                    backups.restore(db, args.path, args.force, args.keep_tokens))
        except backups.Failed as error:
            sys.exit(f'{args.command} failed: {error}')
        except KeyboardInterrupt:  # its transaction rolled back, its temporary file removed
            sys.exit(f'{args.command} interrupted: nothing was changed')
        for line in done:
            print(f'{args.command}: {line}', file=sys.stderr)
        return 0
    if args.command == 'serve':
        config.host, config.port, config.workers = args.host, args.port, args.workers
        loopback = config.host == 'localhost' or security.is_in(config.host, security.networks(security.LOOPBACK))
        if not config.auth and not loopback:
            sys.exit(f'refusing to serve {config.host} with PEOPLE_AUTH=off: without tokens anyone who can '
                     f'reach the port could read and change every person. Bind 127.0.0.1, or turn auth on.')
        if not (args.check or OLD_WORKERS in os.environ or 'LISTEN_FDS' in os.environ):  # served by this service
            refuse_served_port(config.host, config.port)
    db = database_for(args.command, config.database_url)
    if args.command == 'seed':
        if not args.force and db.execute_sql('SELECT 1 FROM people LIMIT 1').fetchone():
            sys.exit('seed failed: the database holds people already, whom generated ones would be mixed with: '
                     'seed an empty one, or --force to add them')
        storage.drop_list_indexes(db)  # rebuilt after the load by create_schema(): ~3x faster than row by row
        try:
            seed(models.People(db), args.count)
        finally:  # an interrupted seed must not leave the lists without their indexes
            storage.create_schema(db)
        print(f'seed: {args.count} people added in {safe_url(config.database_url)}', file=sys.stderr)
        return 0
    elif args.command == 'token':
        return manage_tokens(args)
    elif args.command == 'serve':
        getattr(db, 'close_all', db.close)()  # really closed, pooled or not: see Master.run
        watch = telemetry.Watch(config.workers)
        if args.check:  # loads what serving would, counting nowhere: a temporary metrics directory, removed
            with tempfile.TemporaryDirectory(prefix='people-metrics-') as scratch:
                config.metrics_dir = config.metrics_dir or scratch
                create_app(config, watch)
            return
        # A reload's exec() keeps counting in the same directory, and removes it at the end if it made it.
        temporary = os.environ.setdefault('PEOPLE_METRICS_TEMPORARY', str(config.metrics_dir is None)) == 'True'
        config.metrics_dir = os.environ['METRICS_DIR'] = config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-')
        Master(create_app(config, watch), config, watch).run()
        if temporary:
            shutil.rmtree(config.metrics_dir, ignore_errors=True)
        return
    print(f'{args.command}: done in {safe_url(config.database_url)}', file=sys.stderr)

if __name__ == '__main__':
    main()
