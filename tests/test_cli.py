"""The command line beside `serve`: seeding generated people, tokens, and the Makefile's commands."""
import os
import pty
import re
import select
import socket
import subprocess
import sys
import time

import pytest

import storage
from conftest import ROOT, free_port, make_on_a_taken_port
from models import FIELDS, validate


def test_seed_inserts_valid_people_in_batches(database_url):
    subprocess.run([sys.executable, 'service.py', 'seed', '--count', '12345'], cwd=ROOT, check=True,
                   env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'}, capture_output=True)
    db = storage.open_database(database_url)
    try:
        rows = db.execute_sql('SELECT id, name, age, locale FROM people ORDER BY id').fetchall()
    finally:
        db.close()
    assert [row[0] for row in rows] == list(range(1, 12346))
    for row in rows[::500]:
        assert validate(dict(zip(FIELDS, row[1:])))  # every generated person obeys the field rules


def test_seed_refuses_a_database_that_holds_people_unless_forced(tmp_path):
    """Generated people mixed into real ones could never be told apart again."""
    url = f'sqlite:///{tmp_path}/p.db'
    assert cli(url, 'seed', '--count', '10') == (0, '', f'seed: 10 people added in {url}\n')
    assert cli(url, 'seed', '--count', '10') == (1, '', 'seed failed: the database holds people already, whom '
                                                 'generated ones would be mixed with: seed an empty one, or --force '
                                                 'to add them\n')
    assert cli(url, 'seed', '--count', '10', '--force')[0] == 0
    db = storage.open_database(url)
    assert db.execute_sql('SELECT count(*) FROM people').fetchone() == (20,)
    assert {'people_name', 'people_locale'} <= {index.name for index in db.get_indexes('people')}
    db.close()


def cli(database_url, *args):
    """`service.py ARGS` on the database: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, 'service.py', *args], cwd=ROOT, capture_output=True, text=True,
                            env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'})
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize('command', [['init-db'], ['serve', '--port', 'FREE'], ['seed', '--count', '1'], ['token', 'list'],
                                     ['token', 'create', '--name', 'a', '--scope', 'read'], ['token', 'revoke', 'a']])
def test_a_database_that_cannot_be_opened_is_one_line_for_every_command(tmp_path, command):
    """Before: a ~90-line traceback from every command but backup and restore (a README walk found it)."""
    nowhere = free_port()  # nothing listens there
    for url, cause in [(f'postgresql://postgres@127.0.0.1:{nowhere}/people', 'Connection refused'),
                       (f'sqlite:///{tmp_path}/missing/p.db', 'unable to open database file')]:
        code, out, said = cli(url, *[str(free_port()) if word == 'FREE' else word for word in command])
        assert (code, out) == (1, ''), said
        assert re.fullmatch(rf'{command[0]} failed: cannot open {re.escape(url)}: .*{cause}.*\n', said), said
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('url, cause', [
    ('postgresql://', 'has no database name'), ('foo://x', 'unsupported scheme'), ('', 'unsupported scheme'),
    ('postgresql://u@127.0.0.1:99999/x', 'Port out of range'), ('postgresql://u@[::1/x', 'Invalid IPv6 URL'),
    ('mysql://u@127.0.0.1/x', 'MySQL driver not installed'), ('NOT_A_DATABASE', 'file is not a database')])
def test_a_database_url_that_names_nothing_usable_is_one_line(tmp_path, url, cause):
    if url == 'NOT_A_DATABASE':
        (tmp_path / 'p.db').write_text('not a database\n' * 100)
        url = f'sqlite:///{tmp_path}/p.db'
    assert cli(url, 'init-db')[0:2] == (1, '')
    assert re.fullmatch(rf'init-db failed: cannot open {re.escape(url)}: .*{cause}.*\n', cli(url, 'init-db')[2])


@pytest.mark.parametrize('url', ['sqlite://', 'sqlite:///', 'sqlite:///:memory:'])
def test_a_database_in_memory_is_refused(url):
    """Each process would have its own: a token made there was stored nowhere, workers answered 503."""
    for command in (['init-db'], ['token', 'create', '--name', 'a', '--scope', 'read']):
        assert cli(url, *command) == (1, '', f'{command[0]} failed: {url} is a database in memory, which no other '
                                             f'process sees: name a file\n')


@pytest.mark.parametrize('setting', ['PORT=abc', 'WORKERS=x', 'DRAIN_SECONDS=x', 'PEOPLE_ALLOW=garbage',
                                     'METRICS_ALLOW=1.2.3', 'LOG_LEVEL=verbose', 'LIST_SCAN=0', 'LIST_SCAN=-5',
                                     'WORKERS=0', 'DRAIN_SECONDS=-1', 'DRAIN_SECONDS=nan', 'REQUEST_DEADLINE=0'])
def test_a_malformed_setting_is_one_line_naming_it(tmp_path, setting):
    name, value = setting.split('=')
    result = subprocess.run([sys.executable, 'service.py', 'token', 'list'], cwd=ROOT, capture_output=True, text=True,
                            env={'DATABASE_URL': f'sqlite:///{tmp_path}/p.db', 'PATH': '/usr/bin:/bin', name: value})
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert result.stderr.startswith(f"a setting in the environment is malformed: {name}='{value}': ")


def test_workers_below_one_are_refused(tmp_path):
    """--workers 0 was taken as 1 without a word."""
    result = subprocess.run([sys.executable, 'service.py', 'serve', '--workers', '0'], cwd=ROOT, capture_output=True,
                            text=True, env={'DATABASE_URL': f'sqlite:///{tmp_path}/p.db', 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 2 and "argument --workers: invalid number value: '0'" in result.stderr


@pytest.mark.parametrize('given', [['--port', '70000'], ['--port', '-1'], ['--port', '0'], ['PORT=70000']])
def test_a_port_out_of_range_is_refused_before_anything_starts(tmp_path, given):
    env = {'DATABASE_URL': f'sqlite:///{tmp_path}/p.db', 'PATH': '/usr/bin:/bin', 'PEOPLE_AUTH': 'off'}
    if given[0].startswith('PORT='):
        env['PORT'], given = given[0][5:], []
    result = subprocess.run([sys.executable, 'service.py', 'serve', *given], cwd=ROOT, capture_output=True, text=True,
                            env=env, timeout=30)
    if given:
        assert result.returncode == 2 and 'argument --port: a port is 1-65535, not ' in result.stderr, result.stderr
    else:  # PORT is read with the other settings, and refused in their words
        assert result.stderr == "a setting in the environment is malformed: PORT='70000': a port is 1-65535, not '70000'\n"
    assert os.listdir(tmp_path) == []


def test_a_token_name_that_is_not_text_is_refused(tmp_path):
    name = os.fsdecode(b'\xff')  # a byte that is not UTF-8, as a shell passes it on
    for action in (['create', '--name', name, '--scope', 'read'], ['revoke', name]):
        assert cli(f'sqlite:///{tmp_path}/p.db', 'token', *action) == (
            1, '', "a token name is printable text, not '\\udcff'\n")


def test_an_ipv6_host_is_one_line_saying_bjoern_serves_ipv4(tmp_path):
    result = subprocess.run([sys.executable, 'service.py', 'serve', '--host', '::1', '--port', str(free_port())],
                            cwd=ROOT, capture_output=True, text=True, timeout=30,
                            env={'DATABASE_URL': f'sqlite:///{tmp_path}/p.db', 'PATH': '/usr/bin:/bin'})
    assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
    assert 'bjoern serves IPv4 only' in result.stderr and os.listdir(tmp_path) == []


def test_token_ttl_out_of_form_says_what_a_ttl_is(tmp_path):
    code, _, errors = cli(f'sqlite:///{tmp_path}/p.db', 'token', 'create', '--name', 'a', '--scope', 'read',
                          '--ttl', '5y')
    assert code == 2 and "argument --ttl: a TTL is seconds, or 30m, 12h, 30d" in errors and "'5y'" in errors


def test_token_lifetimes_are_shown_as_a_date_and_a_duration(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    code, secret, said = cli(url, 'token', 'create', '--name', 'ci', '--scope', 'write', '--ttl', '12h')
    assert code == 0 and secret.startswith('people_')
    assert re.search(r'token "ci" \(write\) expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 12 hours\)', said), said
    assert re.search(r'^ci\twrite\texpires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 12 hours\)\tnever used\t0 requests$',
                     cli(url, 'token', 'list')[1])
    cli(url, 'token', 'create', '--name', 'short', '--scope', 'read', '--ttl', '90m')
    assert '(in 90 minutes)' in cli(url, 'token', 'list')[1]


def test_token_name_taken_and_name_too_long_are_told_apart(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    cli(url, 'token', 'create', '--name', 'ci', '--scope', 'read')
    assert cli(url, 'token', 'create', '--name', 'ci', '--scope', 'read') == (
        1, '', "a token named 'ci' exists or existed (names are never reused): pick another name\n")
    assert cli(url, 'token', 'create', '--name', 'x' * 101, '--scope', 'read') == (
        1, '', 'a token name is 1-100 characters, not 101\n')


def test_token_list_says_when_there_are_none(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    assert cli(url, 'token', 'list') == (0, '', 'no tokens; make one with: token create --name NAME --scope read|write\n')


def test_token_revoke_confirms(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    cli(url, 'token', 'create', '--name', 'ci', '--scope', 'read')
    assert cli(url, 'token', 'revoke', 'ci') == (0, '', "token 'ci' revoked: every worker refuses it within 10 s\n")
    assert cli(url, 'token', 'revoke', 'ci') == (1, '', "no live token is named 'ci' (token list shows the revoked ones)\n")
    assert re.fullmatch(r'ci\tread\trevoked \d{4}-\d\d-\d\d \d\d:\d\d UTC\tnever used\t0 requests\n', cli(url, 'token', 'list')[1])


def test_make_run_stops_on_ctrl_c_without_make_reporting_an_interrupt(tmp_path):
    """At a terminal, Ctrl-C signals make too, and GNU make reports its own SIGINT as a failure
    ("make: *** [run] Interrupt", exit 130); deploy/foreground.py gives the service the terminal."""
    port = free_port()
    pid, terminal = pty.fork()
    if pid == 0:  # the child: make run on a terminal of its own, as a person runs it
        os.chdir(ROOT)
        os.execvp('make', ['make', '-o', '.venv/.installed', 'run', f'PORT={port}',
                           f'DATABASE_URL=sqlite:///{tmp_path}/people.db'])
    output = bytearray()

    def read_until(done, seconds=30):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not done():
            if select.select([terminal], [], [], 0.1)[0]:
                try:
                    output.extend(os.read(terminal, 65536))
                except OSError:  # the terminal closed: make has exited
                    return

    def answers():
        with socket.socket() as s:
            return s.connect_ex(('127.0.0.1', port)) == 0

    read_until(answers)
    assert answers(), output.decode()
    os.write(terminal, b'\x03')  # Ctrl-C
    read_until(lambda: False)  # until the terminal closes as make exits (30 s at most)
    deadline = time.monotonic() + 10
    while (exited := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.close(terminal)
    assert exited[0] == pid, output.decode()
    assert os.waitstatus_to_exitcode(exited[1]) == 0, output.decode()
    assert b'"stopped"' in output and b'Interrupt' not in output, output.decode()


def test_make_run_on_a_taken_port_prints_only_the_services_line(monkeypatch, tmp_path):
    """make adds "make: *** [Makefile:N: run] Error 1" under a failed recipe: the Makefile stops make
    quietly instead, and the exit still says it failed."""
    monkeypatch.setenv('DATABASE_URL', f'sqlite:///{tmp_path}/people.db')
    port, status, printed = make_on_a_taken_port('run', 'PORT')
    assert status != 0
    assert printed == f'cannot serve on 127.0.0.1:{port}: Address already in use; is another server running there?\n'


def test_make_run_that_cannot_start_fails_where_make_ignores_sigint(monkeypatch, tmp_path):
    """A script's background job starts with SIGINT ignored: the SIGINT the recipe sends make does nothing
    there, and the recipe's own status must still fail make."""
    monkeypatch.setenv('DATABASE_URL', f'sqlite:///{tmp_path}/people.db')
    port, status, printed = make_on_a_taken_port('run', 'PORT', ignore_sigint=True)
    assert status != 0, printed


def test_make_reset_db_and_clean_remove_the_database_and_its_lock(tmp_path):
    files = ['people.db', 'people.db-wal', 'people.db-shm', 'people.db.write-lock']
    for name in files:
        (tmp_path / name).write_text('')
    (tmp_path / '.venv').mkdir()
    makefile = os.path.join(ROOT, 'Makefile')
    subprocess.run(['make', '-s', '-f', makefile, 'reset-db'], cwd=tmp_path, check=True)
    assert os.listdir(tmp_path) == ['.venv']  # a fresh database, the virtualenv kept
    for name in files:
        (tmp_path / name).write_text('')
    subprocess.run(['make', '-s', '-f', makefile, 'clean'], cwd=tmp_path, check=True)
    assert os.listdir(tmp_path) == []
