"""bench/run.py, compare.py, layers.py and instructions.py, as docs/performance.md runs them: run.py direct,
through nginx and through PgBouncer finishes each way and reports its workload without errors, compare.py
and layers.py each target side by side, and instructions.py counts each of its cases. Tiny and short,
smoke tests: no figure they print is checked (but the ceiling's own 1.00), since this machine is shared
and noisy."""
import re
import socket
import subprocess
import sys

import pytest

from conftest import PG_URL, ROOT, free_port
from test_deploy import HEADERS_MORE, require


def consecutive_free_ports(count=3):
    """A port with the next count - 1 free too: bench/run.py serves on PORT and puts nginx on PORT + 1 and + 2."""
    for _ in range(100):
        first, held = free_port(), []
        try:
            for port in range(first, first + count):
                held.append(socket.socket())
                held[-1].bind(('127.0.0.1', port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    pytest.fail(f'no {count} consecutive free ports')


@pytest.mark.parametrize('way', ['direct', 'nginx', 'pgbouncer'])
def test_bench_runs_each_way_and_reports_no_errors(way, request):
    require('wrk', 'REQUIRE_WRK')
    options = []
    if way == 'nginx':
        require('nginx', 'REQUIRE_NGINX')
        require(HEADERS_MORE, 'REQUIRE_NGINX')
        options = ['--stack']
    if way == 'pgbouncer':
        require('pgbouncer', 'REQUIRE_PGBOUNCER')
        request.getfixturevalue('pg_schema')  # skips, or fails under REQUIRE_POSTGRES, without a server
        options = ['--pooler', '--database-url', PG_URL]
    result = subprocess.run([sys.executable, 'bench/run.py', '--rows', '200', '--seconds', '1', '--conns', '2',
                             '--only', 'read', '--port', str(consecutive_free_ports()), *options],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if way == 'pgbouncer':  # the database it made for itself is gone
        admin, _ = request.getfixturevalue('pg_schema')
        name = re.search(r'^bench: database (people_bench_\w+) ', result.stdout, re.M)[1]
        cursor = admin.cursor()
        cursor.execute('SELECT count(*) FROM pg_database WHERE datname = %s', (name,))
        assert cursor.fetchone()[0] == 0
    assert re.search(r'^read\s+\d+\s+[\d.]+\s+[\d.]+\s+0\s', result.stdout, re.M), result.stdout
    assert ('through PgBouncer' in result.stdout) == (way == 'pgbouncer')
    assert ('through nginx over TLS' in result.stdout) == (way == 'nginx')


COMPARE = {  # name -> (script and its options, the targets it prints)
    'direct': (['bench/compare.py', '--only', 'ceiling,service'], ['ceiling', 'service']),
    'production': (['bench/compare.py', '--only', 'ceiling,service', '--production'], ['ceiling', 'service']),
    'stack': (['bench/compare.py', '--only', 'ceiling,service', '--stack'], ['ceiling', 'service']),
    'peers, creating': (['bench/compare.py', '--only', 'ceiling,flask,fastapi', '--workload', 'create'],
                        ['ceiling', 'flask', 'fastapi']),  # installs them from PyPI, pinned, in a temporary venv
    'layers': (['bench/layers.py'], ['ceiling', 'falcon_floor', 'falcon_floor_forked', 'service_no_middleware',
                                     'service_headers_only', 'service']),
}


@pytest.mark.parametrize('case', list(COMPARE))
def test_side_by_side_runs_each_target_without_errors(case):
    require('wrk', 'REQUIRE_WRK')
    if case == 'stack':
        require('nginx', 'REQUIRE_NGINX')
        require(HEADERS_MORE, 'REQUIRE_NGINX')
    command, names = COMPARE[case]
    result = subprocess.run([sys.executable, *command, '--rounds', '1', '--seconds', '1', '--conns', '2',
                             '--port', str(consecutive_free_ports())], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = re.findall(r'^(\w+)\s+\d+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+0\s', result.stdout, re.M)
    assert [name for name, _ in printed] == names and printed[0][1] == '1.00', result.stdout


def test_instruction_counts_run_each_case():
    require('valgrind', 'REQUIRE_VALGRIND')
    result = subprocess.run([sys.executable, 'bench/instructions.py', '--requests', '50'], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    counts = dict(re.findall(r'^(\w+)\s+(-?[\d,]+) instructions a request$', result.stdout, re.M))
    assert list(counts) == ['read_production', 'read_auth_off', 'create_form'], result.stdout
    assert all(int(count.replace(',', '')) > 0 for count in counts.values()), result.stdout


def test_bulk_workload_reports_people_a_second_without_errors():
    require('wrk', 'REQUIRE_WRK')
    result = subprocess.run([sys.executable, 'bench/run.py', '--rows', '200', '--seconds', '1', '--conns', '2',
                             '--only', 'bulk', '--batch', '10', '--port', str(consecutive_free_ports())],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'^bulk\s+\d+\s+[\d.]+\s+[\d.]+\s+0\s', result.stdout, re.M), result.stdout
    assert re.search(r'^bulk, 10 people a request: [1-9]\d* people/s', result.stdout, re.M), result.stdout
