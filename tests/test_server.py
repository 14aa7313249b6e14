"""The real thing: `service.py serve` on bjoern over loopback, on SQLite and PostgreSQL."""
import contextlib
import functools
import http.client
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings


import pytest

import models
import storage
from conftest import ROOT, Server, free_port

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


def curl(*args):
    result = subprocess.run(['curl', '-s', '-w', '\n%{http_code}', *args], capture_output=True, text=True, timeout=10)
    body, status = result.stdout.rsplit('\n', 1)
    return int(status), body


def stored(database_url, person_id):
    """A person as the database holds it, read without the server."""
    db = storage.open_database(database_url)
    try:
        found = models.People(db).find(person_id)
        return found and found[0]
    finally:
        db.close()


def test_original_curl_commands(server):
    status, body = curl(f'{server.url}/resources/data/', '-d', 'data={"name": "peter", "locale": "NYC", "age": 42}',
                        '-X', 'PUT')
    assert status == 201 and json.loads(body) == {'id': 1, **PETER}
    assert curl(f'{server.url}/resources/data/1') == (200, body)
    assert curl(f'{server.url}/resources/data/1', '-X', 'DELETE') == (200, body)
    status, body = curl(f'{server.url}/resources/data/1')
    assert status == 404 and json.loads(body)['status'] == 404


def test_keep_alive_serves_many_requests_on_one_connection(server):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=5)
    conn.request('POST', '/resources/data/', json.dumps(PETER), {'Content-Type': 'application/json'})
    assert conn.getresponse().read() and conn.sock is not None
    first_socket = conn.sock
    for _ in range(20):
        conn.request('GET', '/resources/data/1')
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())['name'] == 'peter'
    assert conn.sock is first_socket  # never reconnected
    conn.close()


@pytest.mark.parametrize('length', [b'', b'Content-Length: 0\r\n', b'Content-Length: 5\r\n'])
def test_chunked_body_is_read_not_taken_as_empty(server, length):
    """With a Content-Length as well, the chunked body still counts (RFC 9112 6.3): it was read as empty or cut."""
    body = json.dumps(PETER).encode()
    request = (b'POST /resources/data/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n' + length +
               b'Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n'
               + b'%x\r\n%s\r\n0\r\n\r\n' % (len(body), body))
    with socket.create_connection(('127.0.0.1', server.port), timeout=5) as s:
        s.sendall(request)
        reply = b''
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b'HTTP/1.1 201'), reply
    assert json.loads(reply.split(b'\r\n\r\n', 1)[1]) == {'id': 1, **PETER}


def create_many(port, count, results):
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    for i in range(count):
        person = {'name': f'p{threading.get_ident()}-{i}', 'age': i % 150, 'locale': 'NYC'}
        try:
            conn.request('POST', '/resources/data/', json.dumps(person), {'Content-Type': 'application/json'})
            response = conn.getresponse()
            results.append((response.status, person, json.loads(response.read())))
        except (OSError, http.client.HTTPException):
            results.append((None, person, None))  # a connection cut by the shutdown: not acknowledged
            conn.close()
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
            time.sleep(0.01)
    conn.close()


@contextlib.contextmanager
def create_load(server, threads, per_thread, started):
    """Creates from `threads` connections; entered once `started` have been answered, it yields
    the (status, person, body) results, and on leaving waits for every thread to finish."""
    results = []
    workers = [threading.Thread(target=create_many, args=(server.port, per_thread, results)) for _ in range(threads)]
    for t in workers:
        t.start()
    try:
        deadline = time.monotonic() + 10
        while len(results) < started and time.monotonic() < deadline:
            time.sleep(0.01)
        yield results
    finally:
        for t in workers:
            t.join(60)


def test_twelve_connections_create_concurrently(server, database_url):
    results = []
    threads = [threading.Thread(target=create_many, args=(server.port, 25, results)) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = [status for status, _, _ in results]
    assert statuses == [201] * 300
    ids = [body['id'] for _, _, body in results]
    assert len(set(ids)) == 300
    for _, person, body in results[::25]:
        assert stored(database_url, body['id']) == {'id': body['id'], **person}


def create_until(connect, prefix, stop, results, headers=None):
    """Creates on one keep-alive connection until `stop` is set, each person sent once: a request
    whose connection breaks is recorded as unanswered (None) and the next one goes on a new connection."""
    conn = connect()
    for i in itertools.count():
        if stop.is_set():
            break
        person = {'name': f'{prefix}-{i}', 'age': i % 150, 'locale': 'NYC'}
        try:
            conn.request('POST', '/resources/data/', json.dumps(person),
                         {'Content-Type': 'application/json', **(headers or {})})
            response = conn.getresponse()
            results.append((response.status, person, response.read()))
        except (OSError, http.client.HTTPException):
            results.append((None, person, None))
            conn.close()
            conn = connect()
            time.sleep(0.01)
    conn.close()


def drain_under_load(server, connect, prefix, headers=None):
    """Six keep-alive create loops; once a second has passed and creates are answered, SIGTERM to the
    server's process group (as systemd stops it). Returns the master's exit status and the results."""
    results, stop = [], threading.Event()
    loops = [threading.Thread(target=create_until, args=(connect, f'{prefix}-{n}', stop, results, headers))
             for n in range(6)]
    for t in loops:
        t.start()
    try:
        started, deadline = time.monotonic(), time.monotonic() + 15
        while time.monotonic() < deadline and (time.monotonic() - started < 1
                                               or [r[0] for r in results].count(201) < 20):
            time.sleep(0.01)
        server.signal_group(signal.SIGTERM)
        try:
            status = server.process.wait(15)
        except subprocess.TimeoutExpired:  # seen once in CI: say what held the stop, and whether it ended
            held = stuck_stop_report(server)
            try:
                status = server.process.wait(30)  # past REQUEST_DEADLINE, when the master kills a stuck worker
            except subprocess.TimeoutExpired:
                raise AssertionError(f'the server did not stop within 45 s:\n{held}') from None
            warnings.warn(f'the server took over 15 s to stop under load:\n{held}')
    finally:
        stop.set()
        for t in loops:
            t.join(30)
        server.stop()
    return status, results


def stuck_stop_report(server):
    """The server's log, its processes and the sockets on its port, for a stop that takes too long."""
    commands = [['ps', '-o', 'pid,stat,wchan:20,etime,args', '--sid', str(server.process.pid)],
                ['ss', '-tanpo', f'( sport = :{server.port} or dport = :{server.port} )']]
    shown = [subprocess.run(command, capture_output=True, text=True).stdout for command in commands
             if shutil.which(command[0])]
    return '\n'.join([server.output(), *shown])


def committed_but_unanswered(database_url, prefix, results):
    """Creates the database holds that their client was not answered 201 for; and checks that every
    201 reads back as answered."""
    db = storage.open_database(database_url)
    try:
        rows = {name: {'id': id, 'name': name, 'age': age, 'locale': locale}
                for id, name, age, locale in db.execute_sql('SELECT id, name, age, locale FROM people')
                if name.startswith(prefix + '-')}
    finally:
        db.close()
    answered = {person['name']: json.loads(body) for status, person, body in results if status == 201}
    assert len(answered) >= 20
    for name, body in answered.items():
        assert rows.get(name) == body
    return sorted(rows.keys() - answered.keys())


def test_sigterm_to_group_under_load_answers_every_create_it_commits(database_url):
    lost = []  # per run: creates committed that their client was not answered 201 for
    for run in range(8):
        server = Server(database_url, workers=2, DRAIN_SECONDS='3')
        connect = functools.partial(http.client.HTTPConnection, '127.0.0.1', server.port, timeout=10)
        status, results = drain_under_load(server, connect, f'run{run}')
        assert status == 0, server.output()
        assert {status for status, _, _ in results} <= {201, None}  # no 5xx or other errors
        lost.append(len(committed_but_unanswered(database_url, f'run{run}', results)))
    assert lost == [0] * 8, f'committed but unanswered, per run: {lost}'


@pytest.mark.parametrize('to_group', [False, True])
def test_sighup_stops_the_service_and_its_workers(database_url, to_group):
    """A closed terminal (SIGHUP to the group) or a SIGHUP to the master alone: the master died of it and
    left its workers serving the port with nothing to replace them or stop them."""
    server = Server(database_url, workers=2)
    try:
        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        (server.signal_group if to_group else server.process.send_signal)(signal.SIGHUP)
        assert server.process.wait(15) == 0, server.output()
        for pid in map(int, workers):
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)  # the master reaped it, so it is gone
        with pytest.raises(OSError):
            socket.create_connection(('127.0.0.1', server.port), timeout=1)
    finally:
        server.stop()


@pytest.mark.parametrize('split', ['body', 'headers'])
def test_a_request_still_arriving_when_the_stop_begins_is_answered(database_url, split):
    """Found by an adversarial pass: the stop shut every connection's read side at once, so bjoern read
    the end of a request it had half of and dropped it unanswered."""
    server = Server(database_url, workers=1, DRAIN_SECONDS='5')
    body = json.dumps(PETER).encode()
    request = (b'POST /resources/data/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n'
               b'Content-Length: %d\r\nConnection: close\r\n\r\n%s' % (len(body), body))
    cut = request.index(b'\r\n\r\n') + 10 if split == 'body' else 40
    try:
        with socket.create_connection(('127.0.0.1', server.port), timeout=10) as s:
            s.sendall(request[:cut])
            time.sleep(0.3)  # the worker has read the first part
            server.signal_group(signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(request[cut:])
            reply = b''
            while chunk := s.recv(65536):
                reply += chunk
        assert reply.startswith(b'HTTP/1.1 201'), reply
        assert server.process.wait(15) == 0, server.output()
        assert stored(database_url, json.loads(reply.split(b'\r\n\r\n', 1)[1])['id'])['name'] == PETER['name']
    finally:
        server.stop()


def test_a_request_that_never_finishes_arriving_holds_a_stop_only_until_drain_seconds(database_url):
    server = Server(database_url, workers=1, DRAIN_SECONDS='1')
    try:
        with socket.create_connection(('127.0.0.1', server.port), timeout=10) as s:
            s.sendall(b'POST /resources/data/ HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"na')
            time.sleep(0.3)
            started = time.monotonic()
            server.signal_group(signal.SIGTERM)
            assert server.process.wait(15) == 0, server.output()
            assert 0.8 < time.monotonic() - started < 5
            assert s.recv(65536) == b''  # cut, unanswered: nothing of it reached the app
    finally:
        server.stop()


def test_idle_keep_alive_connection_does_not_hold_the_stop(database_url):
    server = Server(database_url, workers=1, DRAIN_SECONDS='60')
    try:
        idle = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
        idle.request('GET', '/resources/data/1')
        assert idle.getresponse().read() and idle.sock is not None  # kept alive, then left idle
        server.process.send_signal(signal.SIGTERM)  # the master alone: it stops its workers
        assert server.process.wait(20) == 0  # long before DRAIN_SECONDS
        assert idle.sock.recv(1) == b''  # the worker closed the idle connection
    finally:
        server.stop()


def test_client_that_does_not_read_its_answer_holds_the_stop_only_until_drain_seconds(database_url):
    server = Server(database_url, workers=1, DRAIN_SECONDS='1')
    try:
        db = storage.open_database(database_url)
        models.Person.insert_many([('x' * 200, 1, 'NYC')] * 500, fields=list(models.FIELDS)).execute()  # a page of ~120 KB
        db.close()
        reader = socket.socket()
        reader.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)  # small segments and window: the
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)   # page cannot all be sent at once
        reader.settimeout(10)
        reader.connect(('127.0.0.1', server.port))
        reader.sendall(b'GET /resources/data/?limit=500 HTTP/1.1\r\nHost: x\r\n\r\n')
        assert reader.recv(1, socket.MSG_PEEK) == b'H'  # the answer has begun, and stalls
        server.process.send_signal(signal.SIGTERM)  # the client never reads on
        assert server.process.wait(30) == 0
        reader.close()
    finally:
        server.stop()


def test_sigint_stops_cleanly(database_url):
    server = Server(database_url, workers=2)
    server.process.send_signal(signal.SIGINT)  # Ctrl-C at a terminal
    assert server.process.wait(10) == 0
    assert 'stopped' in server.output()


def test_dead_worker_is_replaced(database_url):
    server = Server(database_url, workers=1)
    try:
        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True)
        (worker,) = map(int, workers.stdout.split())
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status, _ = curl(f'{server.url}/resources/data/1')
            if status == 404:
                break
            time.sleep(0.05)
        assert status == 404  # a new worker answers
        assert 'starting another' in server.output()
    finally:
        server.stop()


def test_stop_while_a_dead_worker_is_being_replaced_leaves_no_worker_behind(database_url):
    """The master pauses before replacing a dead worker; a stop in that pause once let the new
    worker start after the stop had been sent, and serve on with nothing to stop it."""
    server = Server(database_url, workers=2)
    try:
        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True)
        os.kill(int(workers.stdout.split()[0]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 'starting another' not in server.output():
            time.sleep(0.005)
        server.process.send_signal(signal.SIGTERM)  # within the master's 0.2 s pause
        assert server.process.wait(10) == 0  # the master leaves only once every worker has
    finally:
        server.stop()


def test_worker_that_cannot_bind_logs_one_line_and_the_master_serves_on_once_it_can(database_url):
    """A worker failing at start once unwound, with a traceback, through the master's frames it had copied."""
    server = Server(database_url, workers=1)
    foreign = socket.socket()
    try:
        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True)
        os.kill(int(workers.stdout.split()[0]), signal.SIGKILL)
        foreign.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not SO_REUSEPORT: no worker may join it
        deadline = time.monotonic() + 5
        while True:  # the port is free from the worker's death until its replacement binds
            try:
                foreign.bind(('127.0.0.1', server.port))
                foreign.listen(1)  # listening: with SO_REUSEADDR alone, a bound socket would still share
                break
            except OSError:
                assert time.monotonic() < deadline, 'the port never came free'
                time.sleep(0.002)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 'worker failed' not in server.output():
            time.sleep(0.05)
        assert 'worker failed' in server.output() and 'Traceback' not in server.output()
        assert server.process.poll() is None
        foreign.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and curl(f'{server.url}/resources/data/1')[0] != 404:
            time.sleep(0.1)
        assert curl(f'{server.url}/resources/data/1')[0] == 404  # a worker serves again
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0
    finally:
        foreign.close()
        server.stop()


def test_failed_fork_is_logged_and_leaves_stops_unblocked(monkeypatch, capsys, tmp_path):
    import server
    import service
    import telemetry
    config = service.Config({}, metrics_dir=str(tmp_path))
    master = server.Master(app=None, config=config, watch=telemetry.Watch(1))

    def no_more_processes():
        raise BlockingIOError(11, 'Resource temporarily unavailable')
    monkeypatch.setattr(os, 'fork', no_more_processes)
    master.spawn(0)  # run() tries the empty slot again on its next pass
    assert master.workers == {}
    assert 'cannot start a worker' in capsys.readouterr().out
    assert not {signal.SIGTERM, signal.SIGINT, signal.SIGUSR2} & signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_second_stop_inside_the_first_finds_the_drain_begun(monkeypatch, tmp_path):
    """A group stop brings a worker two SIGTERMs, and Python may run the second handler inside the first.
    Found in a load run: the first had set its flag but not yet its deadline, so the second raised
    AttributeError into a request, the first never closed the listener nor started its timer, and the
    worker served on through the stop."""
    import server
    import service
    import telemetry
    config = service.Config({}, metrics_dir=str(tmp_path), drain_seconds=5.0, port=free_port())
    master = server.Master(app=None, config=config, watch=telemetry.Watch(1))
    master.drain_deadline, master.listener = None, socket.socket()
    exits, timers, clock, nested = [], [], time.monotonic, []

    def monotonic():  # the second SIGTERM's handler runs at the first's first call
        if not nested:
            nested.append(True)
            master.drain(signal.SIGTERM, None)
        return clock()
    monkeypatch.setattr(server.os, '_exit', exits.append)
    monkeypatch.setattr(server.signal, 'setitimer', lambda *timer: timers.append(timer))
    monkeypatch.setattr(server.time, 'monotonic', monotonic)
    master.drain(signal.SIGTERM, None)
    monkeypatch.undo()
    assert master.watch.is_draining and master.drain_deadline is not None and master.listener.fileno() == -1
    assert timers and exits == [0, 0]  # no connection on its port: each call finds nothing to wait for


def test_pooled_database_is_never_shared_across_workers(database_url):
    """A pool's close() keeps its connection: were the master's connection inherited, every worker
    would read the others' results on one socket (a forged token passing, the wrong person)."""
    pooled = database_url.replace('sqlite://', 'sqlite+pool://').replace('postgresql://', 'postgresql+pool://')
    server = Server(pooled, workers=2)
    try:
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        for i in range(40):
            conn.request('POST', '/resources/data/', json.dumps({**PETER, 'age': i}),
                         {'Content-Type': 'application/json'})
            response = conn.getresponse()
            assert (response.status, response.read()[:1]) == (201, b'{')
        conn.close()
        master_fds = [os.readlink(f'/proc/{server.process.pid}/fd/{fd}')
                      for fd in os.listdir(f'/proc/{server.process.pid}/fd')]
        assert not [fd for fd in master_fds if fd.startswith('socket:') or 'people.db' in fd], master_fds
        wrong = []

        def read_back():  # each thread on connections of its own, reaching both workers
            for round_ in range(10):
                c = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
                for person_id in range(1 + round_ % 2, 41, 2):
                    c.request('GET', f'/resources/data/{person_id}')
                    response = c.getresponse()
                    body = response.read()
                    if response.status != 200 or json.loads(body)['id'] != person_id:
                        wrong.append((person_id, response.status, body[:80]))
                c.close()
        threads = [threading.Thread(target=read_back) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert wrong == []
    finally:
        server.stop()


def serve_beside(port, temp, database_url, **env):
    """A second `serve` on `port`, with its temporary files in `temp`: (exit code, stderr)."""
    temp.mkdir()
    environ = {**os.environ, 'DATABASE_URL': database_url, 'PEOPLE_AUTH': 'off', 'TMPDIR': str(temp), **env}
    second = subprocess.Popen([sys.executable, 'service.py', 'serve', '--port', str(port)], cwd=ROOT, env=environ,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        return second.wait(30), second.stderr.read()
    except subprocess.TimeoutExpired:  # it joined the port and serves: stop it and its workers
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        return None, 'still serving after 30 s'
    finally:
        second.stderr.close()


def test_second_serve_on_a_served_port_refuses_in_one_line(database_url, tmp_path):
    """Workers bind with SO_REUSEPORT: without the check, a copy would silently join the port (tokens
    on, say, beside one with tokens off) and the kernel would split the clients between them."""
    first = Server(database_url, workers=2)
    try:
        code, errors = serve_beside(first.port, tmp_path / 'second', f'sqlite:///{tmp_path}/second/people.db',
                                    PEOPLE_AUTH='on')
        assert code != 0 and errors.count('\n') == 1, errors
        assert errors.startswith(f'cannot serve on 127.0.0.1:{first.port}: Address already in use'), errors
        assert os.listdir(tmp_path / 'second') == []  # no people-metrics-* directory, not even its database
        assert curl(f'{first.url}/resources/data/1')[0] == 404  # the first serves on, alone
    finally:
        first.stop()


def test_serve_on_a_port_a_foreign_process_holds_refuses_in_one_line(database_url, tmp_path):
    with socket.create_server(('127.0.0.1', 0)) as foreign:
        port = foreign.getsockname()[1]
        code, errors = serve_beside(port, tmp_path / 'second', database_url)
    assert code != 0 and errors.count('\n') == 1 and 'Traceback' not in errors, errors
    assert errors.startswith(f'cannot serve on 127.0.0.1:{port}: Address already in use'), errors
    assert os.listdir(tmp_path / 'second') == []


def test_serving_line_says_tokens_and_database_without_password(tmp_path):
    url = f'sqlite:///{tmp_path}/people.db'
    server = Server(url, workers=1, PEOPLE_AUTH='on')
    try:
        serving = json.loads(server.output().splitlines()[0])
    finally:
        server.stop()
    assert serving['event'] == 'serving' and serving['tokens'] == 'on' and serving['database'] == url
    from service import safe_url
    assert safe_url('postgresql://app:s3cret@db:5432/people?password=s3cret') == \
        'postgresql://app:***@db:5432/people?password=***'


@pytest.mark.parametrize('password', ['s3cret', 's3/cret', 's3@cr/et', 's3:cret', 's3?cr#et', 's3%2Fcret'])
def test_a_password_is_masked_whatever_it_holds(password):
    """A password holding / was left in the error line; one holding @ showed its end."""
    from service import safe_url
    masked = safe_url(f'postgresql://app:{password}@db.example:5432/people')
    assert masked == 'postgresql://app:***@db.example:5432/people'
    assert 's3' not in safe_url(f'postgresql://db.example/people?user=app&password={password}&sslmode=verify-full')
    assert 's3' not in safe_url(f'postgresql://db.example/people?pass%77ord={password}')  # libpq decodes the key
