"""The people service: configuration, the app factory, the command line (`python service.py --help`),
and serving on bjoern with pre-forked workers that drain on SIGTERM or SIGINT."""
import argparse
import contextlib
import errno
import fcntl
import gc
import os
import re
import shutil
import signal
import socket
import struct
import sys
import tempfile
import termios
import time

import falcon
import peewee

import backups
import models
import security
import telemetry
from openapi import VERSION, OpenAPI
from resources import PREFIX, Collection, Item, add_error_handlers


STOPS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}  # what stops the master, which stops its workers with SIGTERM
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
    db = models.open_database(config.database_url)
    people = models.People(db, config.list_scan)
    log = telemetry.JsonLog(config.log_level)
    counts = telemetry.Counts(config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-'), log)
    middleware = [telemetry.Telemetry(counts, log, config.access_log, watch or telemetry.Watch(1)),
                  security.Guard(config.auth, config.allow, config.trusted_proxies)]
    if config.cors_origins:  # CORS is off unless origins are listed
        middleware.append(falcon.CORSMiddleware(allow_origins=config.cors_origins, expose_headers=['ETag', 'Location']))
    app = falcon.App(media_type='application/json', middleware=middleware)
    app.add_route(PREFIX, Collection(people))
    app.add_route(PREFIX + '{id}', Item(people))
    app.add_route('/openapi.json', OpenAPI())
    app.add_route('/livez', telemetry.Livez())
    app.add_route('/readyz', telemetry.Readyz(people))
    app.add_route('/metrics', telemetry.Metrics(counts, config.metrics_allow, VERSION, config.backup_dir))
    add_error_handlers(app, people, log, counts)
    return app


class Master:
    """Serve with pre-forked bjoern workers: replace any that dies or is stuck past the request
    deadline; on SIGTERM or SIGINT ask each to drain (SIGTERM), and wait for them."""

    def __init__(self, app, config, watch):
        self.app, self.config, self.watch = app, config, watch
        self.log = telemetry.JsonLog(config.log_level)
        self.workers = {}  # pid -> slot in the watch
        self.stopping = False

    def run(self):
        import bjoern  # imported here so that tests and the other commands do not need its C build
        self.bjoern = bjoern
        db = models.database.obj
        # NOTE: a connection must never cross fork(): the master closes its own for real (a pool's
        # close() only returns it to the pool), a child forgets any it inherited (models), and
        # each worker opens its own.
        getattr(db, 'close_all', db.close)()
        telemetry.clear(self.config.metrics_dir)
        for stop in STOPS:  # SIGHUP too: a closed terminal must not leave workers serving without a master
            signal.signal(stop, self.stop)
        self.log('info', 'serving', url=f'http://{self.config.host}:{self.config.port}/', workers=self.config.workers,
                 pid=os.getpid(), tokens='on' if self.config.auth else 'off', database=safe_url(self.config.database_url))
        while self.workers or not self.stopping:
            for slot in set(range(self.config.workers)) - set(self.workers.values()):
                self.spawn(slot)  # at start, after a failed fork(), and for a dead worker; never once stopping
            pid, status = os.waitpid(-1, os.WNOHANG) if self.workers else (0, 0)
            if pid == 0:
                self.kill_stuck()
                time.sleep(0.25)
                continue
            slot = self.workers.pop(pid)
            try:
                telemetry.retire(self.config.metrics_dir, pid)  # its counts stay in the totals; its file goes
            except Exception as error:  # a full or vanished metrics directory must never stop the master
                self.log('error', "a dead worker's counts could not be archived", worker=pid, cause=repr(error))
            self.watch.cells[slot] = 0.0
            if not self.stopping:
                self.log('warning', 'worker ended; starting another', worker=pid, wait_status=status)
                time.sleep(0.2)  # a worker that dies at start must not make this a busy loop
        self.log('info', 'stopped')

    def spawn(self, slot):
        # NOTE: stops are held off across fork(), so that each reaches every worker in self.workers and
        # none starts after one (CPython runs a handler already due before pthread_sigmask() returns, so
        # `stopping` is current); the child holds SIGTERM until it has a listener to drain.
        signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
        try:
            pid = None if self.stopping else os.fork()
        except OSError as error:  # out of processes or memory: run() tries again shortly
            self.log('error', 'cannot start a worker', cause=repr(error))
            pid = None
        if pid != 0:
            if pid:
                self.workers[pid] = slot
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)
            return
        # NOTE: bjoern dies at once on SIGTERM. On SIGINT it stops accepting, but a second SIGINT (a group
        # stop sends two) kills it mid-request, idle keep-alive connections hold it for ever, and it stops
        # the 0.1 s timer that runs Python's signal handlers. So a worker never lets SIGINT through (the
        # master turns every stop into SIGTERM) and drains by itself, in drain().
        try:  # never unwind into the master's frames, which this process copied
            self.watch.slot, self.drain_deadline = slot, None
            self.listener = self.bjoern.bind_and_listen(self.config.host, self.config.port, reuse_port=True)
            signal.signal(signal.SIGTERM, self.drain)
            signal.signal(signal.SIGALRM, self.drain)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # SIGINT and SIGHUP stay blocked
            # Everything loaded so far lives as long as the worker: keep it out of the garbage
            # collector's full passes, which otherwise rescan it every few thousand requests.
            gc.collect()
            gc.freeze()
            self.bjoern.server_run(self.listener, self.app)
        except BaseException as error:
            self.log('error', 'worker failed', cause=repr(error))
            os._exit(1)
        os._exit(0)

    def drain(self, signum, frame):
        """A worker's stop, on SIGTERM then every 0.1 s: stop accepting, close each connection once it is
        answered (idle ones at once), and leave when none is left, or after drain_seconds when those
        left are answers their clients do not read. No request is cut before drain_seconds, however slowly
        it arrives; only one whose bytes come in the same tick as its connection's last answer is."""
        # NOTE: a group stop brings two SIGTERMs, and Python runs the second's handler inside the first's:
        # the deadline, stored in one step, is what both go by (a flag set first once left the second with
        # no deadline, raising into a request and leaving the worker serving on).
        if self.drain_deadline is None:
            self.drain_deadline = time.monotonic() + self.config.drain_seconds
            self.watch.is_draining = True
            # bjoern's accept watcher is left on a closed socket that never wakes it, so server_run()
            # does not return: the worker leaves through os._exit() below.
            self.listener.close()  # new connections go to workers still accepting, else are refused
            signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)
        # NOTE: deciding here, in the worker's one thread, leaves no gap between "idle" and "killed" for a
        # request to fall into. Unsent bytes in the kernel mark an answer its client is not reading; a
        # request still running, or answered but not yet written, has none, so it is always waited for.
        waiting, patient = False, time.monotonic() < self.drain_deadline
        for fd in os.listdir('/proc/self/fd'):
            with contextlib.suppress(OSError):  # not a socket, or closed meanwhile
                connection = socket.socket(fileno=int(fd))
                try:
                    if connection.family == socket.AF_INET and connection.getsockname()[1] == self.config.port:
                        unsent = int.from_bytes(fcntl.ioctl(connection, termios.TIOCOUTQ, bytes(4)), sys.byteorder)
                        waiting |= not unsent or patient
                        if not (patient and is_arriving(connection)):
                            connection.shutdown(socket.SHUT_RD)  # bjoern reads the end once it has answered
                finally:
                    connection.detach()
        if not waiting:
            os._exit(0)

    def kill_stuck(self):
        for pid, slot in self.workers.items():
            if self.watch.is_stuck(slot, self.config.request_deadline):
                self.log('error', 'worker stuck past the request deadline; killing it', worker=pid,
                         deadline=self.config.request_deadline)
                os.kill(pid, signal.SIGKILL)
                self.watch.cells[slot] = 0.0

    def stop(self, signum, frame):
        if not self.stopping:
            self.stopping = True
            self.log('info', 'draining', workers=len(self.workers), seconds=self.config.drain_seconds)
            for pid in self.workers:
                os.kill(pid, signal.SIGTERM)


def is_arriving(connection):
    """Whether a request has come in on this connection since its last answer (or it has had none yet):
    it is still arriving, or running. bjoern reads eagerly, so only the kernel's TCP_INFO tells: the
    milliseconds since data was last sent and received, and how many segments carried data each way."""
    info = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 160)
    sent_ago, received_ago = struct.unpack_from('=I4xI', info, 44)  # tcpi_last_data_sent, tcpi_last_data_recv
    data_in, data_out = struct.unpack_from('=II', info, 152)  # tcpi_data_segs_in, tcpi_data_segs_out
    return data_in > 0 and (data_out == 0 or received_ago < sent_ago)


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
            sys.exit(f'a token named {args.name!r} already exists; revoke it first (token revoke {args.name})')
        print(f'token "{args.name}" ({args.scope}) {expiry(time.time() + args.ttl)}; shown only now:', file=sys.stderr)
        print(secret)
    elif args.action == 'list':
        tokens = models.list_tokens()
        for token in tokens:
            print(f"{token['name']}\t{token['scope']}\t{expiry(token['expires_at'])}")
        if not tokens:
            print('no tokens; make one with: token create --name NAME --scope read|write', file=sys.stderr)
    elif models.revoke_token(args.name):
        print(f'token {args.name!r} revoked: every worker refuses it within {security.CACHE_SECONDS} s', file=sys.stderr)
    else:
        sys.exit(f'no token is named {args.name!r}')
    return 0


def expiry(expires_at):
    """'expires 2026-01-31 12:00 UTC (in 30 days)', or 'expired'."""
    left = expires_at - time.time()
    count, unit = next((round(left / size), unit) for size, unit in ((86400, 'day'), (3600, 'hour'), (60, 'minute'),
                                                                      (1, 'second')) if left >= 2 * size or size == 1)
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expires_at))
    return 'expired' if left <= 0 else f"expires {when} (in {count} {unit}{'s' * (count != 1)})"


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


def safe_url(url):
    """A database URL with its password masked, for logs and messages."""
    # Up to the last @: a password may hold / or @ unescaped, and hiding too much is the safe mistake.
    return re.sub(r'(?i)(password=)[^&]*', r'\1***', re.sub(r'(://[^/@:]*:).*@', r'\1***@', url))


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
    token_actions.add_parser('list', help='names, scopes and expiry; never secrets')
    token_actions.add_parser('revoke', help='delete a token').add_argument('name')
    return parser


def database(url, command, schema=True):
    """The database DATABASE_URL names, with the tables schema.sql defines (unless not `schema`: backup and
    restore touch nothing before they must), or an exit with one line saying why it cannot be used."""
    try:
        db = models.open_database(url)
        if isinstance(db, peewee.SqliteDatabase) and db.database in ('', ':memory:'):
            sys.exit(f'{command} failed: {url} is a database in memory, which no other process sees: name a file')
        missing = models.create_schema(db) if schema else []
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
        db = database(config.database_url, args.command, schema=False)
        try:
            done = ([backups.take(db, args.path)] if args.command == 'backup' else
                    backups.restore(db, args.path, args.force, args.keep_tokens))
        except backups.Failed as error:
            sys.exit(f'{args.command} failed: {error}')
        for line in done:
            print(f'{args.command}: {line}', file=sys.stderr)
        return 0
    if args.command == 'serve':
        config.host, config.port, config.workers = args.host, args.port, args.workers
        loopback = config.host == 'localhost' or security.is_in(config.host, security.networks(security.LOOPBACK))
        if not config.auth and not loopback:
            sys.exit(f'refusing to serve {config.host} with PEOPLE_AUTH=off: without tokens anyone who can '
                     f'reach the port could read and change every person. Bind 127.0.0.1, or turn auth on.')
        refuse_served_port(config.host, config.port)
    db = database(config.database_url, args.command)
    if args.command == 'seed':
        if not args.force and db.execute_sql('SELECT 1 FROM people LIMIT 1').fetchone():
            sys.exit('seed failed: the database holds people already, whom generated ones would be mixed with: '
                     'seed an empty one, or --force to add them')
        models.drop_list_indexes(db)  # rebuilt after the load by create_schema(): ~3x faster than row by row
        try:
            seed(models.People(db), args.count)
        finally:  # an interrupted seed must not leave the lists without their indexes
            models.create_schema(db)
        print(f'seed: {args.count} people added in {safe_url(config.database_url)}', file=sys.stderr)
        return 0
    elif args.command == 'token':
        return manage_tokens(args)
    elif args.command == 'serve':
        getattr(db, 'close_all', db.close)()  # really closed, pooled or not: see Master.run
        temporary = config.metrics_dir is None
        config.metrics_dir = config.metrics_dir or tempfile.mkdtemp(prefix='people-metrics-')
        watch = telemetry.Watch(config.workers)
        Master(create_app(config, watch), config, watch).run()
        if temporary:
            shutil.rmtree(config.metrics_dir, ignore_errors=True)
        return
    print(f'{args.command}: done in {safe_url(config.database_url)}', file=sys.stderr)

if __name__ == '__main__':
    main()
