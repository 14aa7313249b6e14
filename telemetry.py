"""Observability: request ids, JSON logs, /livez and /readyz, and Prometheus metrics that are
exact across bjoern workers.

Each worker adds its counts in place to its own memory-mapped file (memory writes, no syscalls,
~1 us a request); /metrics sums the files. When a worker dies the master folds its file into one
archive, so totals survive replacement and the directory holds one file per live worker.
"""
import calendar
import collections
import contextlib
import glob
import itertools
import json
import mmap
import os
import re
import struct
import sys
import time
from bisect import bisect_left

import falcon
import orjson

import security

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
METHODS = {'GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'}  # others count as 'other'
UNCOUNTED = {'/livez', '/readyz', '/metrics'}  # probes and scrapes would drown the real traffic
REQUEST_ID = re.compile(r'[A-Za-z0-9._:-]{1,128}')
BACKUP_NAME = re.compile(r'people-(\d{8}T\d{6}Z)\.backup')  # as deploy/people-backup names them
FILE_SIZE = 2 << 20  # room for ~2,000 method-route-status series of 16 cells; the labels allow < 1,000
USED = struct.Struct('<Q')  # file header: bytes in use, published after each new entry ...
HEADER_SIZE = 16  # ... then one spare cell, counted into if the file is ever full
KEY_LENGTH = struct.Struct('<I')
VALUE = struct.Struct('<d')
LEVELS = {'debug': 10, 'info': 20, 'warning': 30, 'error': 40}
# Token names are labels: operators make them, but a worker reports at most this many, the rest as 'other'.
MAX_TOKEN_NAMES = 20
USE_SECONDS = 60  # how often a worker adds its tokens' use to the database: never a write a request


def level(name):
    """For LOG_LEVEL: one of LEVELS."""
    if name not in LEVELS:
        raise ValueError(f"not one of {', '.join(LEVELS)}")
    return name


def safe_url(url):
    """A database URL with its password masked, for logs and messages."""
    # Up to the last @: a password may hold / or @ unescaped, and hiding too much is the safe mistake.
    url = re.sub(r'(://[^/@:]*:).*@', r'\1***@', url)
    return re.sub(r'(?i)((?:^|[?&])(?:p|%70)(?:a|%61)(?:s|%73)(?:s|%73)(?:w|%77)(?:o|%6f)(?:r|%72)(?:d|%64)=)[^&]*',
                  r'\1***', url)  # password=, however its letters are escaped (libpq decodes them)


class JsonLog:
    """Log lines as JSON objects on stdout, one per line, for journald."""

    def __init__(self, level='info', stream=None):
        self.threshold = LEVELS[level]
        self.stream = stream or sys.stdout

    def __call__(self, level, event, **fields):
        if LEVELS[level] >= self.threshold:
            line = orjson.dumps({'time': round(time.time(), 6), 'level': level, 'event': event, **fields}, default=str)
            self.stream.write(line.decode() + '\n')
            self.stream.flush()


class Counts:
    """This process's counters, kept in its own file under `directory`."""

    def __init__(self, directory, log):
        self.directory, self.log = directory, log
        self.forget()
        os.register_at_fork(after_in_child=self.forget)  # a worker must never write its parent's file

    def forget(self):
        self.map = None
        self.series = {}  # (method, route, status as Falcon holds it, token) -> its cells ([None]: not counted)
        self.token_names = set()

    def open(self):
        self.used, self.cells_by_key = HEADER_SIZE, {}
        try:
            os.makedirs(self.directory, exist_ok=True)
            path = os.path.join(self.directory, f'{os.getpid()}.counts')
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                # NOTE: the blocks are reserved here, where a full filesystem is an error: a sparse
                # file's page that cannot be allocated kills the process (SIGBUS) when first written.
                os.posix_fallocate(fd, 0, FILE_SIZE)
                self.map = mmap.mmap(fd, FILE_SIZE)
            except OSError:
                os.unlink(path)
                raise
            finally:
                os.close(fd)
        except OSError as error:  # metrics must never cost a request: count in memory, unpublished
            self.log('error', 'metrics file unavailable; this worker is missing from /metrics', cause=repr(error))
            self.map = bytearray(FILE_SIZE)
        self.cells = memoryview(self.map).cast('d')  # the file as doubles: += on a cell is ~50 ns

    def add(self, key, amount=1.0):
        cell = self.cell(key)  # first: it opens the file, and with it self.cells
        self.cells[cell] += amount

    def new_entry(self, key):
        data = orjson.dumps(key)
        data += b' ' * (-(KEY_LENGTH.size + len(data)) % 8)  # keep the value 8-byte aligned
        offset = self.used + KEY_LENGTH.size + len(data)
        if offset + VALUE.size > FILE_SIZE:
            return 1  # full (the labels keep it from happening): the spare cell, never read
        KEY_LENGTH.pack_into(self.map, self.used, len(data))
        self.map[self.used + KEY_LENGTH.size:offset] = data
        VALUE.pack_into(self.map, offset, 0.0)
        self.used = offset + VALUE.size
        USED.pack_into(self.map, 0, self.used)  # last, so a reader never sees half an entry
        self.cells_by_key[key] = offset // VALUE.size
        return offset // VALUE.size

    def request(self, method, route, status, seconds, token=None):
        """Three cells a request: the duration's bucket, the duration sum, and the token's count. The
        request counter and the histogram's count are both sums of buckets, made at scrape time. A series'
        cells are found once, so a request costs one dict lookup and three additions (~0.2 us)."""
        cells = self.series.get((method, route, status, token)) or self.new_series(method, route, status, token)
        if cells[0] is not None:
            self.cells[cells[bisect_left(BUCKETS, seconds)]] += 1.0
            self.cells[cells[-2]] += seconds
            self.cells[cells[-1]] += 1.0

    def new_series(self, method, route, status, token):
        labels = (method if method in METHODS else 'other', route or 'unmatched', falcon.http_status_to_code(status))
        cells = [None]  # probes and scrapes are not counted
        if labels[1] not in UNCOUNTED:
            cells = [self.cell(('bucket', *labels, bucket)) for bucket in range(len(BUCKETS) + 1)]
            cells.append(self.cell(('sum', *labels)))
            if token is not None and token not in self.token_names and len(self.token_names) < MAX_TOKEN_NAMES:
                self.token_names.add(token)
            name = '-' if token is None else token if token in self.token_names else 'other'
            cells.append(self.cell(('token', name, labels[1], f'{labels[2] // 100}xx')))
        self.series[method, route, status, token] = cells
        return cells

    def cell(self, key):
        if self.map is None:
            self.open()
        cell = self.cells_by_key.get(key)
        return self.new_entry(key) if cell is None else cell


def read_counts(path):
    with open(path, 'rb') as f:
        head = f.read(USED.size)
        data = head + f.read(USED.unpack(head)[0] - USED.size)
    position, counts = HEADER_SIZE, {}
    while position < len(data):
        length = KEY_LENGTH.unpack_from(data, position)[0]
        key = tuple(json.loads(data[position + KEY_LENGTH.size:position + KEY_LENGTH.size + length]))
        position += KEY_LENGTH.size + length
        counts[key] = VALUE.unpack_from(data, position)[0]
        position += VALUE.size
    return counts


def archive_path(directory):
    return os.path.join(directory, 'archive.json')


def load_archive(directory):
    try:
        with open(archive_path(directory)) as f:
            archive = json.load(f)
    except FileNotFoundError:
        return set(), collections.Counter()
    return set(archive['absorbed']), collections.Counter({tuple(key): value for key, value in archive['counts']})


def totals(directory):
    """Counts summed over live workers and the archive of dead ones. Files are read before the
    archive, so a worker folded in meanwhile is counted once, from whichever holds it."""
    files = {}
    for path in glob.glob(os.path.join(directory, '*.counts')):
        try:
            files[int(os.path.basename(path).split('.')[0])] = read_counts(path)
        except (OSError, ValueError, struct.error):
            pass  # folded into the archive and removed since the listing, or unreadable
    absorbed, summed = load_archive(directory)
    for pid, counts in files.items():
        if pid not in absorbed:
            summed.update(counts)  # a Counter: adds
    return summed


def retire(directory, pid):
    """Fold a dead worker's counts into the archive, then remove its file (the master calls this)."""
    path = os.path.join(directory, f'{pid}.counts')
    if not os.path.exists(path):
        return
    absorbed, counts = load_archive(directory)
    counts.update(read_counts(path))
    absorbed = [p for p in absorbed if os.path.exists(os.path.join(directory, f'{p}.counts'))] + [pid]
    with open(archive_path(directory) + '.tmp', 'w') as f:
        json.dump({'absorbed': absorbed, 'counts': [[list(key), value] for key, value in counts.items()]}, f)
    os.replace(archive_path(directory) + '.tmp', archive_path(directory))
    os.unlink(path)


def clear(directory):
    """Start a fresh count: the master calls this before it forks workers."""
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, '*.counts')) + glob.glob(archive_path(directory)):
        os.unlink(path)


def exposition(summed, started, version, backup_dir=None):
    """The Prometheus text format of the summed counts."""
    requests, buckets, sums = {}, {}, {}
    for key, value in summed.items():
        if key[0] == 'bucket':  # ('bucket', method, route, status, the bucket's index)
            requests[key[1:4]] = requests.get(key[1:4], 0.0) + value
            buckets.setdefault(key[1:3], [0.0] * (len(BUCKETS) + 1))[key[4]] += value
        elif key[0] == 'sum':  # ('sum', method, route, status)
            sums[key[1:3]] = sums.get(key[1:3], 0.0) + value
    lines = family('http_requests_total', 'counter', 'Requests answered, by method, route template and status.')
    lines += [f'http_requests_total{{method="{method}",route="{route}",status="{status}"}} {count:.0f}'
              for (method, route, status), count in sorted(requests.items())]
    lines += family('http_request_duration_seconds', 'histogram', 'Time from routing to response, by method and route.')
    for method, route in sorted(buckets.keys() | sums.keys()):  # a full file may hold a sum but not its buckets
        labels = f'method="{method}",route="{route}"'
        counts = buckets.get((method, route), [0.0] * (len(BUCKETS) + 1))
        for bound, count in zip((*map(str, BUCKETS), '+Inf'), itertools.accumulate(counts)):
            lines.append(f'http_request_duration_seconds_bucket{{{labels},le="{bound}"}} {count:.0f}')
        lines.append(f'http_request_duration_seconds_sum{{{labels}}} {sums.get((method, route), 0.0)}')
        lines.append(f'http_request_duration_seconds_count{{{labels}}} {sum(counts):.0f}')
    lines += family('people_token_requests_total', 'counter', 'Requests by token name ("-": no valid token; '
                    f'"other": past the first {MAX_TOKEN_NAMES} names a worker saw), route and status class.')
    lines += [f'people_token_requests_total{{token="{label(key[1])}",route="{key[2]}",status="{key[3]}"}} {value:.0f}'
              for key, value in sorted(summed.items(), key=str) if key[0] == 'token']
    lines += family('people_created_total', 'counter', 'People created; a bulk create counts each of its people.')
    lines.append(f'people_created_total {summed.get(("people_created",), 0.0):.0f}')
    lines += family('people_database_errors_total', 'counter', 'Database failures, by kind.')
    lines += [f'people_database_errors_total{{kind="{key[1]}"}} {value:.0f}'
              for key, value in sorted(summed.items(), key=str) if key[0] == 'database_errors']
    lines += family('people_start_time_seconds', 'gauge', 'When the service started, in Unix time.')
    lines += [f'people_start_time_seconds {started}', *family('people_build_info', 'gauge', 'The running version.'),
              f'people_build_info{{version="{version}",python="{sys.version.split()[0]}"}} 1']
    if backup_dir:
        lines += family('people_backup_last_success_timestamp_seconds', 'gauge', 'When the newest backup was written; 0: none.')
        lines.append(f'people_backup_last_success_timestamp_seconds {newest_backup(backup_dir)}')
    return '\n'.join(lines) + '\n'


def family(name, kind, description):
    return [f'# HELP {name} {description}', f'# TYPE {name} {kind}']


def label(value):  # a label value as the text format escapes it (a token name is printable: no newline)
    return value.replace('\\', '\\\\').replace('"', '\\"')


def newest_backup(directory):
    """When the newest backup in `directory` was taken, or 0. Only the names the timer writes count
    (people-20260101T031500Z.backup), and a backup is as old as its name says, or its file if older:
    an old backup copied in (a restore drill) or a file touched must not silence the no-backup alert."""
    newest = 0
    with contextlib.suppress(OSError, ValueError):  # no directory yet, a backup removed meanwhile, a bad date
        for entry in os.scandir(directory):
            if taken := BACKUP_NAME.fullmatch(entry.name):
                named = calendar.timegm(time.strptime(taken[1], '%Y%m%dT%H%M%SZ'))
                newest = max(newest, min(named, entry.stat().st_mtime))
    return newest


class Watch:
    """When each worker's current request began (0: idle), in memory that the master maps before
    fork() and so shares with its workers: the master kills a worker stuck past the deadline."""

    def __init__(self, slots):
        self.cells = memoryview(mmap.mmap(-1, VALUE.size * slots)).cast('d')
        self.slot = 0  # set in each worker by the master
        self.is_draining = False  # set in a worker that is stopping
        self.before_exit = lambda: None  # called by a worker that drained, just before it leaves

    def is_stuck(self, slot, deadline):
        started = self.cells[slot]
        return started > 0 and time.monotonic() - started > deadline


class Telemetry:
    """Middleware: a request id on every request, then its metrics and its access log line.
    One middleware, because every middleware call costs the hot path."""

    def __init__(self, counts, log, access_log, watch, record_use=None):
        self.counts, self.log, self.access_log, self.watch = counts, log, access_log, watch
        self.record_use = record_use
        watch.before_exit = self.add_use  # a leaving worker adds what it counted since its last write
        self.forget()
        os.register_at_fork(after_in_child=self.forget)

    def forget(self):
        self.id_prefix = os.urandom(6).hex()  # random per process: unique across workers and restarts
        self.ids = itertools.count(1)
        self.used, self.use_due = {}, time.monotonic() + USE_SECONDS  # token name -> (requests, last used)

    def process_request(self, req, resp):
        req.context.started = self.watch.cells[self.watch.slot] = time.monotonic()
        request_id = req.env.get('HTTP_X_REQUEST_ID')  # what get_header() reads, without its name munging
        if request_id is None or not REQUEST_ID.fullmatch(request_id):
            request_id = f'{self.id_prefix}-{next(self.ids)}'
        req.context.request_id = request_id
        req.context.token = None  # the name of the valid token the request carries: the Guard sets it
        resp._headers['x-request-id'] = request_id  # what set_header() stores, for a fraction of its cost

    def process_response(self, req, resp, resource, req_succeeded):
        self.watch.cells[self.watch.slot] = 0.0
        if self.watch.is_draining:  # keep-alive clients (nginx's pool too) leave after this answer
            resp.set_header('Connection', 'close')
        now = time.monotonic()
        seconds, token = now - req.context.started, req.context.token
        # Labels are normalised once per series, inside Counts: raw values are cheaper to look up.
        self.counts.request(req.method, req.uri_template, resp.status, seconds, token)
        if token is not None:
            self.used[token] = (self.used.get(token, (0,))[0] + 1, now)
            if now >= self.use_due:
                self.add_use()
        if self.access_log:
            self.log('info', 'request', request_id=req.context.request_id, method=req.method,
                     route=req.uri_template or 'unmatched', path=req.path, status=resp.status_code,
                     duration_ms=round(seconds * 1000, 3), client=req.context.client)

    def add_use(self):
        """Add the tokens' use counted since the last time to the database, in one transaction."""
        self.use_due = time.monotonic() + USE_SECONDS
        if self.used and self.record_use:
            offset = time.time() - time.monotonic()  # the times are the monotonic clock's: to wall-clock time
            try:
                self.record_use({name: (n, when + offset) for name, (n, when) in self.used.items()})
                self.used = {}
            except Exception as error:  # never the request's failure: kept, and tried again in a minute
                self.log('error', 'token use not recorded; kept for the next try', cause=repr(error))


class Livez:
    def on_get(self, req, resp):
        resp.data = b'{"status":"ok"}'


class Readyz:
    def __init__(self, people, watch):
        self.people, self.watch = people, watch

    def on_get(self, req, resp):
        if self.watch.is_draining:  # from the drain's first moment, so that a balancer stops sending here
            raise falcon.HTTPServiceUnavailable(description='This worker is stopping.', retry_after=1)
        self.people.ping()  # a database error becomes 503 in the error handlers
        resp.data = b'{"status":"ready"}'


class Metrics:
    def __init__(self, counts, allow, version, backup_dir=None):
        self.counts, self.allow, self.version, self.backup_dir = counts, allow, version, backup_dir
        self.started = time.time()

    def on_get(self, req, resp):
        if not security.is_in(req.context.client, self.allow):  # behind a trusted proxy: the real client
            raise falcon.HTTPForbidden(description='Metrics are served only to the addresses in METRICS_ALLOW.')
        resp.content_type = 'text/plain; version=0.0.4; charset=utf-8'
        resp.text = exposition(totals(self.counts.directory), self.started, self.version, self.backup_dir)
