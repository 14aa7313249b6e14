"""The operator's tools around the service: `bench/run.py` works in a database of its own on a shared
PostgreSQL server and touches no other, and the Makefile's recipes never print a database password."""
import importlib.util
import os
import subprocess

import psycopg2
import pytest

from conftest import PG_URL, ROOT, free_port
from test_deploy import require

_spec = importlib.util.spec_from_file_location('bench_run', os.path.join(ROOT, 'bench', 'run.py'))
bench_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_run)


def database_exists(admin, name):
    cursor = admin.cursor()
    cursor.execute('SELECT 1 FROM pg_database WHERE datname = %s', (name,))
    return cursor.fetchone() is not None


def test_bench_databases_are_its_own_and_the_one_it_used_to_drop_survives(pg_schema):
    """Two runs on one server get two databases, each dropped at its end; `people_bench` (the fixed
    name every run used to drop WITH (FORCE)) keeps its table and its open connection."""
    admin, _ = pg_schema
    made_here = not database_exists(admin, 'people_bench')
    if made_here:
        admin.cursor().execute('CREATE DATABASE people_bench')
    try:
        bystander = psycopg2.connect(PG_URL.rsplit('/', 1)[0] + '/people_bench')
        bystander.autocommit = True
        bystander.cursor().execute('CREATE TABLE IF NOT EXISTS bystander (x int)')
        with bench_run.own_database(PG_URL) as first, bench_run.own_database(PG_URL) as second:
            names = [url.rsplit('/', 1)[1] for url in (first, second)]
            assert names[0] != names[1] and all(name.startswith('people_bench_') for name in names)
            assert all(database_exists(admin, name) for name in names)
        assert not any(database_exists(admin, name) for name in names)
        bystander.cursor().execute('SELECT count(*) FROM bystander')  # the connection still works
        bystander.close()
        assert database_exists(admin, 'test')  # the database the URL names: only connected to
    finally:
        if made_here:
            admin.cursor().execute('DROP DATABASE IF EXISTS people_bench WITH (FORCE)')


@pytest.mark.parametrize('ending', [RuntimeError, KeyboardInterrupt])
def test_bench_drops_its_database_after_an_error_or_ctrl_c(pg_schema, ending):
    admin, _ = pg_schema
    with pytest.raises(ending):
        with bench_run.own_database(PG_URL) as url:
            name = url.rsplit('/', 1)[1]
            raise ending()
    assert not database_exists(admin, name)


def test_bench_refuses_a_database_url_that_is_not_postgresql(tmp_path):
    """It would seed into that file: a benchmark only writes into what it made."""
    result = subprocess.run([bench_run.PYTHON, 'bench/run.py', '--database-url', f'sqlite:///{tmp_path}/people.db'],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and 'takes a PostgreSQL URL' in result.stderr, result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('target, password', [('run', 's3cret'), ('bench', 's3cret'),
                                              ('bench', 's3%zzcret')])  # libpq quotes a malformed one back
def test_make_prints_no_database_password(target, password):
    """Nothing listens on port 1: the command fails at once, after make would have echoed its recipe."""
    url = f'postgresql://people:{password}@127.0.0.1:1/people'
    if target == 'run':
        arguments = [f'DATABASE_URL={url}', f'PORT={free_port()}']
    else:
        require('wrk', 'REQUIRE_WRK')  # or the recipe installs it
        arguments = [f'BENCH_ARGS=--rows 10 --database-url {url}']
    result = subprocess.run(['make', '--no-print-directory', target, *arguments], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and 'cannot' in output, output  # it failed, and said why
    assert password not in output, output
