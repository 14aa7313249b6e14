"""`service.py backup` and `restore`: a restore drill under a create load on each backend, and
every way a backup can fail leaving nothing behind."""
import contextlib
import http.client
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import psycopg2
import pytest
import webtest

import backups
import models
import storage
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
    db = storage.open_database(database_url)
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
    path = str(backups / 'people-20260101T000000Z.backup')  # as the timer names them: the metric counts it
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
        storage.open_database(database_url)
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
    assert 'people_backup_last_success_timestamp_seconds 1767225600\n' in metrics  # the time its name says
    assert sorted(os.listdir(backups)) == [os.path.basename(path), os.path.basename(path) + '.sha256']  # no temporary file
    assert {status for _, status, _, _, _ in acknowledged} == {201}

    restored = cli(fresh_url, 'restore', path)
    assert restored.returncode == 0, restored.stderr
    in_backup = {row[0]: row for row in rows(fresh_url)}
    before = [(key, body) for answered, _, key, _, body in acknowledged if answered < began]
    assert len(before) >= 120
    for _, body in before:
        assert in_backup[body['id']] == (body['id'], body['name'], body['age'], body['locale'])
    if database_url.startswith('sqlite'):
        assert storage.open_database(fresh_url).execute_sql('PRAGMA integrity_check').fetchone() == ('ok',)
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
    storage.open_database(fresh_url)
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


def test_backup_onto_a_directory_says_so(seeded, tmp_path):
    (tmp_path / 'dir').mkdir()
    assert_failed(cli(seeded, 'backup', str(tmp_path / 'dir')), 'backup', 'is a directory: name a file in it')
    assert os.listdir(tmp_path / 'dir') == []


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
        db = storage.open_database(fresh_url)
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


def test_backup_metric_is_the_time_of_the_newest_backup_the_timer_wrote(tmp_path):
    """Only the timer's names count, and a backup is as old as its name says: an old one copied in (with a
    new modification time) or any other file touched leaves the alert's clock where it was."""
    directory = tmp_path / 'backups'
    app = create_app(Config(environ={'PEOPLE_AUTH': 'off', 'BACKUP_DIR': str(directory)},
                            database_url=f'sqlite:///{tmp_path}/people.db', metrics_dir=str(tmp_path / 'metrics')))
    client = webtest.TestApp(app)
    assert 'people_backup_last_success_timestamp_seconds 0\n' in client.get('/metrics').text  # none yet
    directory.mkdir()
    for name, mtime in (('people-19700101T001640Z.backup', 1000.5), ('people-19700101T003320Z.backup', 2000.5),
                        ('.people-19700101T005000Z.backup.partial', 3000.5), ('copied-in.backup', 4000.5),
                        ('people-19700101T010640Z.backup.sha256', 4000.5)):
        (directory / name).write_text('x')
        os.utime(directory / name, (mtime, mtime))
    assert 'people_backup_last_success_timestamp_seconds 2000\n' in client.get('/metrics').text
    (directory / 'people-19700101T001640Z.backup').touch()  # an old backup copied in, or touched, now
    assert 'people_backup_last_success_timestamp_seconds 2000\n' in client.get('/metrics').text
    models.database.close()


# What an operator's command must never do: write before it has checked, rewind ids, or replace in part.

def state(database_url):
    """What a refused command must leave as it was: SQLite's files byte for byte, PostgreSQL's rows."""
    if database_url.startswith('sqlite'):
        path = database_url.removeprefix('sqlite:///')
        return {name: open(name, 'rb').read() for name in (path, path + '-wal') if os.path.exists(name)}
    db = storage.open_database(database_url)
    try:
        return [db.execute_sql(f'SELECT * FROM {table} ORDER BY 1').fetchall() for table in backups.TABLES]
    finally:
        db.close()


@pytest.mark.parametrize('target', ['', '-wal', '-shm', '.write-lock', 'symlink', 'wal-of-a-linked-url'])
def test_backup_refuses_the_database_and_its_files(tmp_path, target):
    url = f'sqlite:///{tmp_path}/people.db'
    if target == 'wal-of-a-linked-url':  # SQLite keeps the -wal beside the file the link names, not the link
        (tmp_path / 'link.db').symlink_to(tmp_path / 'people.db')
        url, target = f'sqlite:///{tmp_path}/link.db', '-wal'
    assert cli(url, 'seed', '--count', '100').returncode == 0
    writer = sqlite3.connect(tmp_path / 'people.db')  # holds a WAL and its index open, as a serving worker does
    writer.execute('PRAGMA wal_autocheckpoint=0')
    with writer:
        writer.execute("INSERT INTO people (name, age, locale) VALUES ('wal', 1, 'W')")
    path = tmp_path / f'people.db{target}'
    if target == 'symlink':
        path = tmp_path / 'link.backup'
        path.symlink_to(tmp_path / 'people.db')
    before = state(url)
    result = cli(url, 'backup', str(path))
    after = state(url)
    writer.close()
    assert_failed(result, 'backup', 'is the database itself')
    assert after == before
    assert storage.open_database(url).execute_sql('PRAGMA integrity_check').fetchone() == ('ok',)
    models.database.close()


def craft(kind, database_url, tmp_path):
    """A file that is no backup of this service, of each kind an operator may hand restore."""
    path, sqlite_backend = tmp_path / f'{kind}.backup', database_url.startswith('sqlite')
    if kind == 'empty':  # what a failed copy leaves
        path.write_bytes(b'')
    elif kind == 'truncated':
        other = tmp_path / 'whole.backup'
        assert cli(database_url, 'backup', str(other)).returncode == 0
        path.write_bytes(other.read_bytes()[:len(other.read_bytes()) * 2 // 3])
    elif kind == 'random':
        path.write_bytes(os.urandom(50_000))
    elif kind == 'other-backend':
        other_url = f'sqlite:///{tmp_path}/other.db' if not sqlite_backend else pg_url_in('public')
        if sqlite_backend:  # a PostgreSQL archive: made with pg_dump by hand, as an operator might
            subprocess.run(['pg_dump', '--format=custom', '--table=pg_catalog.pg_am', f'--file={path}', PG_URL],
                           check=True, capture_output=True)
        else:
            assert cli(other_url, 'seed', '--count', '10').returncode == 0
            assert cli(other_url, 'backup', str(path)).returncode == 0
    elif sqlite_backend and kind == 'foreign':  # a file holding only another table
        with sqlite3.connect(path) as db:
            db.execute('CREATE TABLE foo (x)')
        db.close()
    elif sqlite_backend and kind == 'other-schema':  # the service's tables, plus a planted trigger
        other_url = f'sqlite:///{tmp_path}/planted.db'
        assert cli(other_url, 'token', 'create', '--name', 'backdoor', '--scope', 'write').returncode == 0
        with sqlite3.connect(tmp_path / 'planted.db') as db:
            db.execute('CREATE TRIGGER keep AFTER DELETE ON tokens BEGIN INSERT INTO tokens SELECT old.*; END')
        db.close()
        assert cli(other_url, 'backup', str(path)).returncode == 0
    else:  # PostgreSQL: pg_dump of an unrelated table, and of the service's tables with one more beside them
        admin = psycopg2.connect(PG_URL)
        admin.autocommit = True
        schema = 'people_crafted_' + uuid.uuid4().hex[:10]
        try:
            admin.cursor().execute(f'CREATE SCHEMA {schema}')
            url = pg_url_in(schema)
            if kind == 'foreign':
                admin.cursor().execute(f'CREATE TABLE {schema}.foo (x int); INSERT INTO {schema}.foo VALUES (1)')
            else:
                assert cli(url, 'seed', '--count', '10').returncode == 0
                admin.cursor().execute(f'CREATE TABLE {schema}.extra (x int)')
            subprocess.run(['pg_dump', '--format=custom', f'--schema={schema}', f'--file={path}', PG_URL],
                           check=True, capture_output=True)
        finally:
            admin.cursor().execute(f'DROP SCHEMA {schema} CASCADE')
            admin.close()
    return str(path)


@pytest.mark.parametrize('kind', ['empty', 'truncated', 'random', 'other-backend', 'foreign', 'other-schema'])
def test_restore_refuses_what_backup_did_not_write_and_leaves_the_database_as_it_was(seeded, tmp_path, kind):
    """Each refused before the database is touched, even with --force: one line, the data as it was."""
    assert cli(seeded, 'token', 'create', '--name', 'kept', '--scope', 'read').returncode == 0
    path = craft(kind, seeded, tmp_path)
    before = state(seeded)
    result = cli(seeded, 'restore', path, '--force')
    assert_failed(result, 'restore', 'empty: not a backup', 'is damaged', 'is not a SQLite backup',
                  'is not a PostgreSQL backup', 'is a PostgreSQL backup', 'is a SQLite backup',
                  'is not a backup of this service')
    assert state(seeded) == before


def test_restore_refuses_a_backup_changed_since_it_was_written(seeded, tmp_path):
    path = tmp_path / 'people.backup'
    assert cli(seeded, 'backup', str(path)).returncode == 0
    assert (tmp_path / 'people.backup.sha256').read_text().split() == [
        subprocess.run(['sha256sum', str(path)], capture_output=True, text=True).stdout.split()[0], 'people.backup']
    data = bytearray(path.read_bytes())
    data[-200] ^= 1  # one bit, somewhere in the rows
    path.write_bytes(bytes(data))
    fresh = f'sqlite:///{tmp_path}/fresh.db' if seeded.startswith('sqlite') else seeded
    assert_failed(cli(fresh, 'restore', str(path), '--force'), 'restore', 'its SHA-256 differs')


def test_restore_guards_every_table_not_only_people(seeded, fresh_url, tmp_path):
    """A database with tokens and no people is not empty: refused without --force, its tokens kept."""
    path = str(tmp_path / 'people.backup')
    assert cli(seeded, 'backup', path).returncode == 0
    assert cli(fresh_url, 'token', 'create', '--name', 'current', '--scope', 'read').returncode == 0
    before = state(fresh_url)
    assert_failed(cli(fresh_url, 'restore', path), 'restore', 'holds tokens already')
    assert state(fresh_url) == before
    kept = cli(fresh_url, 'restore', path, '--keep-tokens')  # the tokens stay, so nothing held is replaced
    assert kept.returncode == 0, kept.stderr
    assert rows(fresh_url) == rows(seeded)
    storage.open_database(fresh_url)
    assert [token['name'] for token in models.list_tokens()] == ['current']
    models.database.close()


def test_restore_onto_a_new_database_warns_of_no_token(seeded, fresh_url, tmp_path):
    """A new VM from a backup: its tokens are all new to that database, none "revoked" there."""
    path = str(tmp_path / 'people.backup')
    assert cli(seeded, 'token', 'create', '--name', 'old', '--scope', 'read').returncode == 0
    assert cli(seeded, 'backup', path).returncode == 0
    restored = cli(fresh_url, 'restore', path)
    assert restored.returncode == 0 and len(restored.stderr.splitlines()) == 1, restored.stderr


def test_restore_never_hands_out_an_id_twice(seeded, tmp_path):
    """Restore, create, restore the same backup again, create: the second id is past the first."""
    path = str(tmp_path / 'people.backup')
    assert cli(seeded, 'backup', path).returncode == 0
    ids = []
    for _ in range(2):
        assert cli(seeded, 'restore', path, '--force').returncode == 0
        app = webtest.TestApp(create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=seeded,
                                                metrics_dir=str(tmp_path / 'metrics'))))
        ids.append(app.post_json('/resources/data/', {'name': 'after', 'age': 1, 'locale': 'X'}).json['id'])
        models.database.close()
    assert ids[0] == 20_001 and ids[1] == 20_002


def test_restore_says_which_tokens_it_brings_back_and_can_keep_the_current_ones(seeded, tmp_path):
    path = str(tmp_path / 'people.backup')
    for name in ('old', 'revoked'):
        assert cli(seeded, 'token', 'create', '--name', name, '--scope', 'read').returncode == 0
    assert cli(seeded, 'backup', path).returncode == 0
    assert cli(seeded, 'token', 'revoke', 'revoked').returncode == 0
    assert cli(seeded, 'token', 'create', '--name', 'new', '--scope', 'read').returncode == 0
    kept = cli(seeded, 'restore', path, '--force', '--keep-tokens')
    assert kept.returncode == 0 and len(kept.stderr.splitlines()) == 1, kept.stderr
    assert cli(seeded, 'token', 'list').stdout.split('\n')[0].startswith('new\t')
    restored = cli(seeded, 'restore', path, '--force')
    assert restored.returncode == 0, restored.stderr
    assert restored.stderr.splitlines()[1:] == ['restore: tokens revoked here stay revoked: revoked',
                                                'restore: tokens gone, made since the backup: new']
    states = {line.split('\t')[0]: line.split('\t')[2] for line in cli(seeded, 'token', 'list').stdout.splitlines()}
    assert states['old'].startswith('expires') and states['revoked'].startswith('revoked')  # live in the backup


def test_no_restore_brings_a_revoked_token_back(seeded, tmp_path):
    """Restoring a backup from before a token existed, then one from while it was live: the revocation made
    in between survives both (the first restore's backup does not hold the token at all)."""
    before, during = str(tmp_path / 'before.backup'), str(tmp_path / 'during.backup')
    assert cli(seeded, 'backup', before).returncode == 0
    assert cli(seeded, 'token', 'create', '--name', 'leaked', '--scope', 'write').returncode == 0
    assert cli(seeded, 'backup', during).returncode == 0
    assert cli(seeded, 'token', 'revoke', 'leaked').returncode == 0
    for path in (before, during):
        restored = cli(seeded, 'restore', path, '--force')
        assert restored.returncode == 0 and 'tokens revoked here stay revoked: leaked' in restored.stderr
        listed = cli(seeded, 'token', 'list').stdout
        assert listed.startswith('leaked\twrite\trevoked '), listed


def test_restored_postgresql_serves_as_the_least_privileged_role(database_url, tmp_path):
    """The README's recipe: a new database, restore as its owner, the grants, then serve as the app role.
    restore sets what init-db sets (the statement timeout), so the app role has nothing left to create."""
    if database_url.startswith('sqlite'):
        pytest.skip('PostgreSQL roles and grants')
    path = str(tmp_path / 'people.backup')
    assert cli(database_url, 'seed', '--count', '10').returncode == 0
    db = storage.open_database(database_url)
    db.execute_sql('GRANT SELECT ON people, tokens, idempotency_keys TO PUBLIC')  # grants are in the dump (ACL)
    db.close()
    assert cli(database_url, 'backup', path).returncode == 0
    name, server = 'people_restore_' + uuid.uuid4().hex[:10], PG_URL.rsplit('/', 1)[0]
    admin = psycopg2.connect(PG_URL)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute(f'CREATE ROLE {name}_owner LOGIN; CREATE ROLE {name}_app LOGIN')
    cursor.execute(f'CREATE DATABASE {name} OWNER {name}_owner')
    try:
        owner_url = f'postgresql://{name}_owner@{server.split("@", 1)[1]}/{name}'
        restored = cli(owner_url, 'restore', path)
        assert restored.returncode == 0, restored.stderr
        with psycopg2.connect(owner_url) as conn:
            conn.cursor().execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON people, tokens, idempotency_keys '
                                  f'TO {name}_app')
        conn.close()
        app_url = f'postgresql://{name}_app@{server.split("@", 1)[1]}/{name}'
        listed = cli(app_url, 'token', 'list')
        assert listed.returncode == 0 and 'index missing' not in listed.stderr, listed.stderr
        again = cli(owner_url, 'restore', path, '--force')  # into the tables as they are: their grants stay
        assert again.returncode == 0, again.stderr
        assert cli(app_url, 'token', 'list').returncode == 0
        with psycopg2.connect(app_url) as conn:
            cursor2 = conn.cursor()
            cursor2.execute('SHOW statement_timeout')
            assert cursor2.fetchone() == ('5s',)
        conn.close()
    finally:
        cursor.execute(f'DROP DATABASE {name} WITH (FORCE)')
        cursor.execute(f'DROP ROLE {name}_owner; DROP ROLE {name}_app')
        admin.close()


def test_restore_force_while_serving_keeps_every_write_acknowledged_after_it(seeded, tmp_path):
    """restore --force under 4 create loops on 2 workers: readers see the old rows until the swap commits,
    writers wait for it. No 5xx; no id answered twice; every create answered after restore returned is there."""
    path = str(tmp_path / 'people.backup')
    assert cli(seeded, 'backup', path).returncode == 0
    server = Server(seeded, workers=2)
    stop, answers = threading.Event(), []  # (when answered, status, id)

    def create(client):
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
        for i in range(100_000):
            if stop.is_set():
                break
            conn.request('POST', '/resources/data/', json.dumps({'name': f'c{client}-{i}', 'age': 1, 'locale': 'L'}),
                         {'Content-Type': 'application/json'})
            response = conn.getresponse()
            body = json.loads(response.read())
            answers.append((time.monotonic(), response.status, body.get('id')))
        conn.close()

    clients = [threading.Thread(target=create, args=(n,)) for n in range(4)]
    try:
        for client in clients:
            client.start()
        wait_for(lambda: len(answers) >= 100)
        began = time.monotonic()
        result = cli(seeded, 'restore', path, '--force')
        ended = time.monotonic()
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 100)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    try:
        assert result.returncode == 0, result.stderr
        assert {status for _, status, _ in answers} == {201}
        ids = [person_id for _, _, person_id in answers]
        assert len(set(ids)) == len(ids)  # none handed out twice
        stored = {row[0] for row in rows(seeded)}
        after = [person_id for answered, _, person_id in answers if answered > ended]
        assert len(after) >= 100 and set(after) <= stored
        before = [person_id for answered, _, person_id in answers if answered < began]
        assert not set(before) & stored  # the backup had none of them: restore replaced them
        conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=10)
        for person_id in after[:20]:
            conn.request('GET', f'/resources/data/{person_id}')
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        server.stop()


def test_a_tampered_postgresql_backup_runs_nothing(database_url, fresh_url, tmp_path):
    """The archive's CREATE TABLE entry edited to run a program first (the listing is unchanged, so the
    archive passes every check of its list): restore, even as a superuser, runs none of its SQL."""
    if database_url.startswith('sqlite'):
        pytest.skip('a pg_dump archive')
    path, marker = tmp_path / 'people.backup', f'/tmp/people-tampered-{uuid.uuid4().hex[:10]}'
    assert cli(database_url, 'seed', '--count', '10').returncode == 0
    assert cli(database_url, 'backup', str(path)).returncode == 0
    data = path.read_bytes()
    start = re.search(rb'CREATE TABLE \w+\.people ', data).start()  # the people table's entry
    table = data[start + 13:data.index(b' ', start + 13)].decode()  # schema.people
    length = int.from_bytes(data[start - 4:start], 'little')  # pg_dump's string: a sign byte, 4 bytes of length
    assert data[start - 5] == 0 and table.endswith('.people')
    evil = (f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'; CREATE TABLE {table} (id bigint NOT NULL, name text "
            f"NOT NULL, age integer NOT NULL, locale text NOT NULL, version integer DEFAULT 1 NOT NULL);").encode()
    assert len(evil) <= length
    path.write_bytes(data[:start] + evil.ljust(length) + data[start + length:])
    (tmp_path / 'people.backup.sha256').unlink(missing_ok=True)  # as an attacker who cannot write it would leave it
    assert 'people' in subprocess.run(['pg_restore', '--list', str(path)], capture_output=True, text=True).stdout
    result = cli(fresh_url, 'restore', str(path))
    try:
        assert not os.path.exists(marker)
        assert result.returncode == 0, result.stderr  # its rows are good: they are all it gave
        assert len(rows(fresh_url)) == 10
    finally:
        if os.path.exists(marker):
            os.unlink(marker)


def test_a_database_init_db_has_not_set_up_names_that_cause(database_url):
    """Tables there (made some other way), but no statement timeout default: the app role cannot set it. The
    line said "cannot create the tables" of tables that existed; it names what is missing and who can fix it."""
    if database_url.startswith('sqlite'):
        pytest.skip('PostgreSQL roles')
    name, server = 'people_restore_' + uuid.uuid4().hex[:10], PG_URL.rsplit('/', 1)[0]
    admin = psycopg2.connect(PG_URL)
    admin.autocommit = True
    cursor = admin.cursor()
    cursor.execute(f'CREATE ROLE {name}_app LOGIN')
    cursor.execute(f'CREATE DATABASE {name}')
    try:
        with psycopg2.connect(f'{server}/{name}') as conn:
            for _, _, statement in storage.schema_statements(models.PostgresqlDatabase(None)):
                conn.cursor().execute(statement)
            conn.cursor().execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON people, tokens, idempotency_keys TO {name}_app')
        conn.close()
        app_url = f'postgresql://{name}_app@{server.split("@", 1)[1]}/{name}'
        result = cli(app_url, 'token', 'list')
        assert_failed(result, 'token', f'is not set up for the service (must be owner of database {name})')
        assert result.stderr.rstrip().endswith('run "service.py init-db" once as the database owner '
                                               '(README: Deploy with PostgreSQL)')
    finally:
        cursor.execute(f'DROP DATABASE {name} WITH (FORCE)')
        cursor.execute(f'DROP ROLE {name}_app')
        admin.close()


def test_restore_copies_the_file_it_checked_whatever_is_renamed_over_it(tmp_path, monkeypatch):
    """A file swapped in between the checks and the copy once restored a foreign file's rows."""
    url, path, evil = f'sqlite:///{tmp_path}/people.db', tmp_path / 'people.backup', tmp_path / 'evil.backup'
    assert cli(f'sqlite:///{tmp_path}/good.db', 'seed', '--count', '10').returncode == 0
    assert cli(f'sqlite:///{tmp_path}/good.db', 'backup', str(path)).returncode == 0
    os.unlink(f'{path}.sha256')
    with sqlite3.connect(evil) as db:  # the same, but its people renamed: it would pass every check too
        db.execute(f"ATTACH DATABASE '{path}' AS good")
        for table in backups.TABLES:
            db.execute(f'CREATE TABLE {table} AS SELECT * FROM good.{table}')
        db.execute("UPDATE people SET name = 'EVIL'")
    db.close()
    checked = backups.check
    monkeypatch.setattr(backups, 'check', lambda *args: checked(*args) or os.replace(evil, path))
    db = storage.open_database(url)
    try:
        with contextlib.suppress(backups.Failed):  # SQLite reopens the name /proc gives: the checked file, or none
            backups.restore(db, str(path))
        storage.create_schema(db)
        assert 'EVIL' not in {name for name, in db.execute_sql('SELECT name FROM people')}
    finally:
        db.close()


@pytest.mark.parametrize('kind', ['wal-mode', 'rows-the-api-refuses', 'fifo', 'sha256-fifo', 'sha256-device',
                                  'sha256-not-text'])
def test_restore_refuses_a_sqlite_file_or_checksum_it_cannot_trust(tmp_path, kind):
    """Each was restored, hung, ran out of memory or printed a traceback; now one line, the database as it was."""
    url, path = f'sqlite:///{tmp_path}/people.db', tmp_path / 'people.backup'
    assert cli(f'sqlite:///{tmp_path}/other.db', 'seed', '--count', '10').returncode == 0
    assert cli(f'sqlite:///{tmp_path}/other.db', 'backup', str(path)).returncode == 0
    assert cli(url, 'seed', '--count', '5').returncode == 0
    checksum = tmp_path / 'people.backup.sha256'
    if kind in ('wal-mode', 'rows-the-api-refuses'):
        checksum.unlink()
        with sqlite3.connect(path) as db:
            if kind == 'wal-mode':  # the row that counts is in the -wal, which no checksum covers
                db.execute('PRAGMA journal_mode=wal')
                db.execute('PRAGMA wal_autocheckpoint=0')
            else:  # SQLite stores any type in any column; the API then answered 500
                db.execute("UPDATE people SET age = 1.5 WHERE id = 1")
                db.execute("UPDATE people SET name = 'a' || char(0) || 'b' WHERE id = 2")
        db.close()
    elif kind == 'fifo':
        path.unlink()
        os.mkfifo(path)
    elif kind == 'sha256-fifo':
        checksum.unlink()
        os.mkfifo(checksum)
    elif kind == 'sha256-device':
        checksum.unlink()
        checksum.symlink_to('/dev/zero')
    else:
        checksum.write_bytes(b'\xff\xfe\x00garbage')
    before = state(url)
    result = subprocess.run([sys.executable, 'service.py', 'restore', str(path), '--force'], cwd=ROOT, timeout=60,
                            capture_output=True, text=True, env={**os.environ, 'DATABASE_URL': url})
    assert_failed(result, 'restore', 'in WAL mode', 'rows the API would refuse', 'is not a file', 'differs from')
    assert state(url) == before


def test_restore_refuses_an_archive_of_two_schemas_or_of_lookalike_tables(database_url, tmp_path):
    """pg_dump of the service's tables in two schemas merged both into one; a table named "people evil" passed."""
    if database_url.startswith('sqlite'):
        pytest.skip('a pg_dump archive')
    admin = psycopg2.connect(PG_URL)
    admin.autocommit = True
    schemas = ['people_crafted_' + uuid.uuid4().hex[:10] for _ in range(2)]
    assert cli(database_url, 'seed', '--count', '2').returncode == 0
    try:
        for schema in schemas:
            admin.cursor().execute(f'CREATE SCHEMA {schema}')
            assert cli(pg_url_in(schema), 'seed', '--count', '3').returncode == 0
        admin.cursor().execute(f'CREATE TABLE {schemas[1]}."people evil" (x int)')
        for name, dump in (('two', [f'--schema={schema}' for schema in schemas]),
                           ('lookalike', [f'--schema={schemas[1]}'])):
            if name == 'lookalike':
                admin.cursor().execute(f'DROP TABLE {schemas[1]}.people CASCADE')
                admin.cursor().execute(f'ALTER TABLE {schemas[1]}."people evil" RENAME TO "people"')
                admin.cursor().execute(f'CREATE TABLE {schemas[1]}."people evil" (x int)')
                admin.cursor().execute(f'CREATE TABLE {schemas[0]}.dummy (x int)')
            subprocess.run(['pg_dump', '--format=custom', *dump, f'--file={tmp_path}/{name}.backup', PG_URL],
                           check=True, capture_output=True)
            before = state(database_url)
            assert_failed(cli(database_url, 'restore', f'{tmp_path}/{name}.backup', '--force'), 'restore',
                          'is not a backup of this service')
            assert state(database_url) == before
    finally:
        for schema in schemas:
            admin.cursor().execute(f'DROP SCHEMA {schema} CASCADE')
        admin.close()


def test_a_backup_of_a_latin1_database_restores_its_accents(database_url, tmp_path):
    """pg_restore writes the rows in the database's encoding: a LATIN1 backup gave a UnicodeDecodeError."""
    if database_url.startswith('sqlite'):
        pytest.skip('PostgreSQL encodings')
    name, server = 'people_restore_' + uuid.uuid4().hex[:10], PG_URL.rsplit('/', 1)[0]
    admin = psycopg2.connect(PG_URL)
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    try:
        latin1 = f'{server}/{name}'
        app = webtest.TestApp(create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=latin1,
                                                metrics_dir=str(tmp_path / 'metrics'))))
        storage.create_schema(models.database.obj)
        app.post_json('/resources/data/', {'name': 'José Müller', 'age': 40, 'locale': 'Zürich'})
        models.database.close()
        assert cli(latin1, 'backup', f'{tmp_path}/latin1.backup').returncode == 0
        restored = cli(database_url, 'restore', f'{tmp_path}/latin1.backup', '--force')
        assert restored.returncode == 0, restored.stderr
        assert [row[1:] for row in rows(database_url)] == [('José Müller', 40, 'Zürich')]
    finally:
        admin.cursor().execute(f'DROP DATABASE {name} WITH (FORCE)')
        admin.close()


def test_an_interrupted_restore_changes_nothing_and_says_so(tmp_path):
    """Ctrl-C during a restore printed a KeyboardInterrupt traceback; the transaction rolls back either way."""
    url, path = f'sqlite:///{tmp_path}/people.db', str(tmp_path / 'people.backup')
    assert cli(url, 'seed', '--count', '500000').returncode == 0
    assert cli(url, 'backup', path).returncode == 0
    before = state(url)
    restore = subprocess.Popen([sys.executable, 'service.py', 'restore', path, '--force'], cwd=ROOT, text=True,
                               stderr=subprocess.PIPE, env={**os.environ, 'DATABASE_URL': url})
    time.sleep(0.5)  # restoring 500,000 people takes seconds: it is still checking or copying
    restore.send_signal(signal.SIGINT)
    assert restore.wait(60) == 1
    assert restore.stderr.read() == 'restore interrupted: nothing was changed\n'
    assert state(url) == before


def test_a_backup_of_an_older_database_restores_into_this_one(database_url, fresh_url, tmp_path):
    """Taken before tokens kept their use and revocation: restored, its tokens get the new columns' defaults."""
    from test_usage import make_old_database
    make_old_database(database_url)
    path = str(tmp_path / 'old.backup')
    assert cli(database_url, 'backup', path).returncode == 0
    restored = cli(fresh_url, 'restore', path)
    assert restored.returncode == 0, restored.stderr
    assert re.search(r'^old\tread\texpires [^\t]+\tnever used\t0 requests$', cli(fresh_url, 'token', 'list').stdout,
                     re.M)
