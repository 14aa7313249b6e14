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

import models
from conftest import ROOT, free_port
from models import FIELDS, validate


def test_seed_inserts_valid_people_in_batches(database_url):
    subprocess.run([sys.executable, 'service.py', 'seed', '--count', '12345'], cwd=ROOT, check=True,
                   env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'}, capture_output=True)
    db = models.open_database(database_url)
    try:
        rows = db.execute_sql('SELECT id, name, age, locale FROM people ORDER BY id').fetchall()
    finally:
        db.close()
    assert [row[0] for row in rows] == list(range(1, 12346))
    for row in rows[::500]:
        assert validate(dict(zip(FIELDS, row[1:])))  # every generated person obeys the field rules


def cli(database_url, *args):
    """`service.py ARGS` on the database: (exit code, stdout, stderr)."""
    result = subprocess.run([sys.executable, 'service.py', *args], cwd=ROOT, capture_output=True, text=True,
                            env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'})
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize('command', [['init-db'], ['serve', '--port', '0'], ['seed', '--count', '1'], ['token', 'list'],
                                     ['token', 'create', '--name', 'a', '--scope', 'read'], ['token', 'revoke', 'a']])
def test_a_database_that_cannot_be_opened_is_one_line_for_every_command(tmp_path, command):
    """Before: a ~90-line traceback from every command but backup and restore (a README walk found it)."""
    nowhere = free_port()  # nothing listens there
    for url, cause in [(f'postgresql://postgres@127.0.0.1:{nowhere}/people', 'Connection refused'),
                       (f'sqlite:///{tmp_path}/missing/p.db', 'unable to open database file')]:
        code, out, said = cli(url, *command)
        assert (code, out) == (1, ''), said
        assert re.fullmatch(rf'{command[0]} failed: cannot open {re.escape(url)}: .*{cause}.*\n', said), said
    assert os.listdir(tmp_path) == []


def test_token_ttl_out_of_form_says_what_a_ttl_is(tmp_path):
    code, _, errors = cli(f'sqlite:///{tmp_path}/p.db', 'token', 'create', '--name', 'a', '--scope', 'read',
                          '--ttl', '5y')
    assert code == 2 and "argument --ttl: a TTL is seconds, or 30m, 12h, 30d" in errors and "'5y'" in errors


def test_token_lifetimes_are_shown_as_a_date_and_a_duration(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    code, secret, said = cli(url, 'token', 'create', '--name', 'ci', '--scope', 'write', '--ttl', '12h')
    assert code == 0 and secret.startswith('people_')
    assert re.search(r'token "ci" \(write\) expires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 12 hours\)', said), said
    assert re.search(r'^ci\twrite\texpires \d{4}-\d\d-\d\d \d\d:\d\d UTC \(in 12 hours\)$', cli(url, 'token', 'list')[1])
    cli(url, 'token', 'create', '--name', 'short', '--scope', 'read', '--ttl', '90m')
    assert '(in 90 minutes)' in cli(url, 'token', 'list')[1]


def test_token_name_taken_and_name_too_long_are_told_apart(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    cli(url, 'token', 'create', '--name', 'ci', '--scope', 'read')
    assert cli(url, 'token', 'create', '--name', 'ci', '--scope', 'read') == (
        1, '', "a token named 'ci' already exists; revoke it first (token revoke ci)\n")
    assert cli(url, 'token', 'create', '--name', 'x' * 101, '--scope', 'read') == (
        1, '', 'a token name is 1-100 characters, not 101\n')


def test_token_list_says_when_there_are_none(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    assert cli(url, 'token', 'list') == (0, '', 'no tokens; make one with: token create --name NAME --scope read|write\n')


def test_token_revoke_confirms(tmp_path):
    url = f'sqlite:///{tmp_path}/p.db'
    cli(url, 'token', 'create', '--name', 'ci', '--scope', 'read')
    assert cli(url, 'token', 'revoke', 'ci') == (0, '', "token 'ci' revoked: every worker refuses it within 10 s\n")
    assert cli(url, 'token', 'revoke', 'ci') == (1, '', "no token is named 'ci'\n")


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
