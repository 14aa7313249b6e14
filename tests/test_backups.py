"""`service.py backup` and `restore`: a restore drill under a create load on each backend, and
every way a backup can fail leaving nothing behind."""
import http.client
import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest
import webtest

import models
from conftest import PG_URL, ROOT, Server, free_port, pg_url_in
from service import Config, create_app


def cli(database_url, *args, prefix=()):
    return subprocess.run([*prefix, sys.executable, 'service.py', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, 'DATABASE_URL': database_url})


def wait_for(condition, seconds=30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, 'condition not met in time'
        time.sleep(0.01)


def assert_failed(result, command, *reasons):
    """One line on stderr naming one of `reasons`, no traceback, a non-zero exit."""
    lines = result.stderr.splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f'{command} failed: ') and any(r in lines[0] for r in reasons), lines[0]


def rows(database_url):
    db = models.open_database(database_url)
    try:
        return db.execute_sql('SELECT id, name, age, locale FROM people ORDER BY id').fetchall()
    finally:
        db.close()


@pytest.fixture
def fresh_url(database_url, tmp_path):
    """Another empty database on the same backend to restore into. PostgreSQL: a new database,
    dropped at the end, with a schema named as the backed-up one (pg_dump's archive names it)."""
    if database_url.startswith('sqlite'):
        yield f'sqlite:///{tmp_path}/restored.db'
        return
    schema, name = re.search(r'search_path%3D(\w+)', database_url)[1], 'people_restore_' + uuid.uuid4().hex[:10]
    server = PG_URL.rsplit('/', 1)[0]
    admin = psycopg2.connect(PG_URL)
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE {name}')
    try:
        with psycopg2.connect(f'{server}/{name}') as conn:
            conn.cursor().execute(f'CREATE SCHEMA {schema}')
        conn.close()
        yield pg_url_in(schema, f'{server}/{name}')
    finally:
        admin.cursor().execute(f'DROP DATABASE {name} WITH (FORCE)')
        admin.close()


@pytest.fixture
def seeded(database_url):
    """The database with 20,000 people: a SQLite file of ~0.8 MB, a pg_dump archive of ~0.3 MB."""
    assert cli(database_url, 'seed', '--count', '20000').returncode == 0
    return database_url


def test_restore_drill_under_a_create_load(database_url, fresh_url, tmp_path):
    """6 clients create people (each with an Idempotency-Key) while `backup` runs; the restore has every
    create acknowledged before the backup began, identical; ids and keys carry on from the backup."""
    backups = tmp_path / 'backups'
    backups.mkdir()
    path = str(backups / 'people.backup')
    server = Server(database_url, workers=2, BACKUP_DIR=str(backups))
    stop, acknowledged = threading.Event(), []  # (when the answer arrived, status, key, person sent, body)

    def create(client):
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
        for i in range(100_000):
            if stop.is_set():
                break
            person, key = {'name': f'client {client} #{i}', 'age': i % 150, 'locale': 'BER'}, f'{client}-{i}'
            conn.request('POST', '/resources/data/', json.dumps(person),
                         {'Content-Type': 'application/json', 'Idempotency-Key': key})
            response = conn.getresponse()
            body = json.loads(response.read())
            acknowledged.append((time.monotonic(), response.status, key, person, body))
        conn.close()

    clients = [threading.Thread(target=create, args=(n,)) for n in range(6)]
    try:
        models.open_database(database_url)
        models.create_token('drill', 'read', 3600)
        models.database.close()
        for client in clients:
            client.start()
        wait_for(lambda: len(acknowledged) >= 120)
        began = time.monotonic()
        result = cli(database_url, 'backup', path)
        during = len(acknowledged)
        wait_for(lambda: len(acknowledged) >= during + 30)  # and the service went on creating
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        conn.request('GET', '/metrics')
        metrics = conn.getresponse().read().decode()
    finally:
        stop.set()
        for client in clients:
            client.join(30)
        server.stop()
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r'backup: \S+: \d+ people, 1 tokens, \d+ idempotency keys; [\d.]+ MB in [\d.]+ s\n',
                        result.stderr), result.stderr
    assert f'people_backup_last_success_timestamp_seconds {os.stat(path).st_mtime}\n' in metrics
    assert os.listdir(backups) == ['people.backup']  # no temporary file left
    assert {status for _, status, _, _, _ in acknowledged} == {201}

    restored = cli(fresh_url, 'restore', path)
    assert restored.returncode == 0, restored.stderr
    in_backup = {row[0]: row for row in rows(fresh_url)}
    before = [(key, body) for answered, _, key, _, body in acknowledged if answered < began]
    assert len(before) >= 120
    for _, body in before:
        assert in_backup[body['id']] == (body['id'], body['name'], body['age'], body['locale'])
    if database_url.startswith('sqlite'):
        assert models.open_database(fresh_url).execute_sql('PRAGMA integrity_check').fetchone() == ('ok',)
        models.database.close()

    server = Server(fresh_url, workers=1)
    try:
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        conn.request('POST', '/resources/data/', json.dumps({'name': 'after', 'age': 1, 'locale': 'BER'}),
                     {'Content-Type': 'application/json'})
        assert json.loads(conn.getresponse().read())['id'] > max(in_backup)
        key, body = before[0]  # a retried create answers as before the backup: the key came back
        conn.request('POST', '/resources/data/', json.dumps({k: body[k] for k in ('name', 'age', 'locale')}),
                     {'Content-Type': 'application/json', 'Idempotency-Key': key})
        assert json.loads(conn.getresponse().read()) == body
    finally:
        server.stop()
    models.open_database(fresh_url)
    assert [token['name'] for token in models.list_tokens()] == ['drill']
    models.database.close()


def test_sqlite_backup_holds_the_writes_still_in_the_wal(tmp_path):
    """SQLite only (PostgreSQL has no such file): writes acknowledged but not yet checkpointed live in
    people.db-wal, which a copy of people.db would miss; the backup API reads them."""
    url, path = f'sqlite:///{tmp_path}/people.db', str(tmp_path / 'people.backup')
    assert cli(url, 'seed', '--count', '100').returncode == 0
    writer = sqlite3.connect(tmp_path / 'people.db')
    writer.execute('PRAGMA wal_autocheckpoint=0')  # what a busy service may hold: commits only in the WAL
    with writer:
        writer.executemany("INSERT INTO people (name, age, locale) VALUES (?, 1, 'WAL')", [(f'w{i}',) for i in range(50)])
    try:
        assert os.path.getsize(tmp_path / 'people.db-wal') > 0
        result = cli(url, 'backup', path)
    finally:
        writer.close()
    assert result.returncode == 0 and ': 150 people,' in result.stderr, result.stderr
    assert cli(f'sqlite:///{tmp_path}/restored.db', 'restore', path).returncode == 0
    assert len(rows(f'sqlite:///{tmp_path}/restored.db')) == 150


def test_backup_into_a_missing_directory_fails_and_creates_nothing(seeded, tmp_path):
    result = cli(seeded, 'backup', str(tmp_path / 'nowhere' / 'people.backup'))
    assert_failed(result, 'backup', 'No such file or directory')
    assert '.partial' not in result.stderr  # the message names what the user asked for, not the temporary file
    assert not (tmp_path / 'nowhere').exists()


def test_backup_into_an_unwritable_directory_fails_and_leaves_it_empty(seeded, tmp_path):
    directory = tmp_path / 'locked'
    directory.mkdir()
    directory.chmod(0o555)
    # NOTE: root writes anywhere through CAP_DAC_OVERRIDE; setpriv drops it from the bounding set, so the
    # backup meets the directory's permissions as the service's own user would.
    prefix = ('setpriv', '--bounding-set=-dac_override,-dac_read_search', '--') if os.geteuid() == 0 else ()
    result = cli(seeded, 'backup', str(directory / 'people.backup'), prefix=prefix)
    assert_failed(result, 'backup', 'Permission denied')
    assert '.partial' not in result.stderr
    assert os.listdir(directory) == []


def test_backup_onto_a_full_disk_fails_and_leaves_nothing(seeded, tmp_path):
    directory = tmp_path / 'small'
    directory.mkdir()
    mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', str(directory)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f'cannot mount a 64 KiB tmpfs here (needs root): {mount.stderr.decode().strip()}')
    try:
        result = cli(seeded, 'backup', str(directory / 'people.backup'))
        assert_failed(result, 'backup', 'disk is full', 'No space left on device')
        assert os.listdir(directory) == []
    finally:
        subprocess.run(['umount', str(directory)], check=True)


def test_backup_of_an_unreachable_database_fails_and_leaves_nothing(database_url, tmp_path):
    if database_url.startswith('sqlite'):
        url = f'sqlite:///{tmp_path}/gone/people.db'  # its directory was removed
    else:
        url = f'postgresql://postgres@127.0.0.1:{free_port()}/test'  # nothing listens there
    result = cli(url, 'backup', str(tmp_path / 'people.backup'))
    assert_failed(result, 'backup', 'unable to open database file', 'Connection refused')
    assert os.listdir(tmp_path) == []


def test_restore_of_a_missing_backup_fails_and_leaves_the_database_untouched(fresh_url, tmp_path):
    assert_failed(cli(fresh_url, 'restore', str(tmp_path / 'absent.backup')), 'restore', 'No such file or directory')
    if fresh_url.startswith('sqlite'):
        assert not os.path.exists(fresh_url.removeprefix('sqlite:///'))  # no empty database file made
    else:
        db = models.open_database(fresh_url)
        assert db.get_tables() == []  # nothing created in the fresh database
        db.close()


def test_restore_refuses_a_database_that_holds_people_unless_forced(seeded, fresh_url, tmp_path):
    path = str(tmp_path / 'people.backup')
    assert cli(seeded, 'backup', path).returncode == 0
    assert cli(fresh_url, 'seed', '--count', '5').returncode == 0
    assert_failed(cli(fresh_url, 'restore', path), 'restore', 'holds people already')
    assert len(rows(fresh_url)) == 5
    forced = cli(fresh_url, 'restore', path, '--force')
    assert forced.returncode == 0, forced.stderr
    assert rows(fresh_url) == rows(seeded)


def test_backup_metric_is_the_time_of_the_newest_whole_backup(tmp_path):
    directory = tmp_path / 'backups'
    app = create_app(Config(environ={'PEOPLE_AUTH': 'off', 'BACKUP_DIR': str(directory)},
                            database_url=f'sqlite:///{tmp_path}/people.db', metrics_dir=str(tmp_path / 'metrics')))
    client = webtest.TestApp(app)
    assert 'people_backup_last_success_timestamp_seconds 0\n' in client.get('/metrics').text  # none yet
    directory.mkdir()
    for name, mtime in (('older.backup', 1000.5), ('newest.backup', 2000.5), ('.in-progress.partial', 3000.5)):
        (directory / name).write_text('x')
        os.utime(directory / name, (mtime, mtime))
    assert 'people_backup_last_success_timestamp_seconds 2000.5\n' in client.get('/metrics').text
    models.database.close()
