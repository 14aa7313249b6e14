"""PgBouncer as deploy/pgbouncer.ini ships it requires TLS of its clients, and the service's
documented URL (`sslmode=verify-full&sslrootcert=...`) reaches libpq through Peewee, so the
service checks that the pooler is the one whose certificate it trusts."""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

import psycopg2
import pytest
import webtest

import models
import storage
from conftest import ROOT, Pooler, free_port
from service import Config, create_app
from test_reliability import PETER


@pytest.fixture
def pooled_url(pooler):
    pooler.admin.cursor().execute('DROP TABLE IF EXISTS people, tokens, idempotency_keys')
    return pooler.url


def verifying(url, ca, **params):
    """`url` with the README's TLS parameters, trusting `ca`."""
    query = '&'.join(f'{name}={value}' for name, value in {'sslmode': 'verify-full', 'sslrootcert': ca,
                                                          **params}.items())
    return f'{url}?{query}'


def token_list(url):
    """`service.py token list` on DATABASE_URL=url: the command line's own way to the database."""
    return subprocess.run([sys.executable, 'service.py', 'token', 'list'], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={**os.environ, 'DATABASE_URL': url})


def self_signed(directory, name):
    """A certificate (and key) for localhost and 127.0.0.1, as deploy/pgbouncer.ini says to make one."""
    cert, key = os.path.join(directory, f'{name}.crt'), os.path.join(directory, f'{name}.key')
    subprocess.run(['openssl', 'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
                    '-nodes', '-days', '2', '-subj', '/CN=localhost', '-addext',
                    'subjectAltName=DNS:localhost,IP:127.0.0.1', '-keyout', key, '-out', cert],
                   check=True, capture_output=True)
    return cert, key


def other_ca(tmp_path):
    """A certificate for the same names as the pooler's, from another key: what an impostor shows."""
    return self_signed(tmp_path, 'other-ca')[0]


def test_a_client_that_asks_for_no_tls_is_refused(pooled_url):
    with pytest.raises(psycopg2.OperationalError, match='SSL required'):
        psycopg2.connect(f'{pooled_url}?sslmode=disable', connect_timeout=3)


def test_the_service_on_the_documented_url_creates_and_reads_over_verified_tls(pooled_url, pooler, tmp_path):
    url = verifying(pooled_url, os.path.join(pooler.work, 'pgbouncer.crt'))
    client = webtest.TestApp(create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=url,
                                               metrics_dir=str(tmp_path / 'metrics'))))
    try:
        storage.create_schema(models.database.obj)
        created = client.post_json('/resources/data/', PETER, status=201).json
        assert client.get(f'/resources/data/{created["id"]}').json == created
        # Peewee handed libpq the URL's query: verify-full against the pooler's certificate, and TLS in use
        assert {'sslmode': 'verify-full', 'sslrootcert': os.path.join(pooler.work, 'pgbouncer.crt')}.items() \
            <= models.database.obj.connect_params.items()
        connection = models.database.connection()
        assert connection.info.ssl_in_use
        assert connection.info.ssl_attribute('protocol') in ('TLSv1.2', 'TLSv1.3')
    finally:
        models.database.close()
    listed = token_list(url)
    assert listed.returncode == 0, listed.stderr


def test_a_client_trusting_another_certificate_is_refused(pooled_url, tmp_path):
    refused = token_list(verifying(pooled_url, other_ca(tmp_path)))
    assert refused.returncode != 0
    assert 'certificate verify failed' in refused.stderr, refused.stderr


def test_a_host_name_the_certificate_does_not_name_is_refused(pooled_url, pooler):
    # libpq connects to hostaddr and checks the certificate against the URL's host name
    url = pooled_url.replace('@127.0.0.1:', '@people-db.invalid:')
    refused = token_list(verifying(url, os.path.join(pooler.work, 'pgbouncer.crt'), hostaddr='127.0.0.1'))
    assert refused.returncode != 0
    assert 'does not match host name "people-db.invalid"' in refused.stderr, refused.stderr


@pytest.mark.parametrize('offer', [['-tls1_2', '-cipher', 'ECDHE-ECDSA-AES128-SHA'],
                                   ['-tls1_1', '-cipher', 'DEFAULT@SECLEVEL=0']], ids=['cbc-sha1', 'tls1.1'])
def test_a_client_offering_only_weak_tls_is_refused(pooler, offer):
    handshake = subprocess.run(['openssl', 's_client', '-starttls', 'postgres', '-connect', f'127.0.0.1:{pooler.port}',
                                *offer], input='', capture_output=True, text=True, timeout=30)
    assert handshake.returncode != 0 and 'Cipher is (NONE)' in handshake.stdout, handshake.stdout


@pytest.fixture(scope='module')
def postgres_elsewhere(pooler):  # pooler: without pgbouncer, skip (or fail) as the pooled tests do
    """A PostgreSQL of its own that takes TLS connections only (hostssl), as one on another machine
    is set up, with a role people_app (password `secret`): (its port, its certificate, the role's
    SCRAM secret for PgBouncer's auth_file)."""
    initdb = (sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb')) or [shutil.which('initdb')])[-1]
    if not initdb:
        pytest.skip('no initdb: apt-get install postgresql')
    work = tempfile.mkdtemp(prefix='people-test-postgres-tls-')  # not under pytest's 0700 tree
    data, port, server = os.path.join(work, 'data'), free_port(), None
    as_owner = ['runuser', '-u', 'postgres', '--'] if os.geteuid() == 0 else []  # PostgreSQL refuses root
    try:
        cert, key = self_signed(work, 'postgres')
        if as_owner:
            for path in (work, key):
                shutil.chown(path, 'postgres')
        subprocess.run([*as_owner, initdb, '-D', data, '-U', 'postgres', '-A', 'trust', '--no-sync'],
                       check=True, capture_output=True)
        with open(os.path.join(data, 'pg_hba.conf'), 'w') as f:
            f.write('hostssl all all 127.0.0.1/32 trust\n')
        server = subprocess.Popen([*as_owner, os.path.join(os.path.dirname(initdb), 'postgres'), '-D', data,
                                   '-c', f'port={port}', '-c', 'listen_addresses=127.0.0.1',
                                   '-c', f'unix_socket_directories={work}', '-c', 'ssl=on',
                                   '-c', f'ssl_cert_file={cert}', '-c', f'ssl_key_file={key}', '-c', 'fsync=off'],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while server.poll() is None and time.monotonic() < deadline:
            try:
                admin = psycopg2.connect(f'postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=require',
                                         connect_timeout=1)
                break
            except psycopg2.OperationalError:
                time.sleep(0.1)
        else:
            raise RuntimeError(f'the TLS-only PostgreSQL did not start (exit {server.poll()})')
        with admin, admin.cursor() as cursor:
            cursor.execute("CREATE ROLE people_app LOGIN PASSWORD 'secret'")
            cursor.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'people_app'")
            scram = cursor.fetchone()[0]
        admin.close()
        yield port, cert, scram
    finally:
        if server:
            server.terminate()  # smart shutdown: its only clients are this module's, closed by now
            server.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def pooler_in_front_of(postgres_elsewhere, ca):
    """PgBouncer from deploy/pgbouncer.ini, switched to the file's recipe for a PostgreSQL on another
    machine: server_tls_sslmode = verify-full, server_tls_ca_file = ca."""
    port, _, scram = postgres_elsewhere
    pooler = Pooler('people_app', scram, pool_size=1, target=('127.0.0.1', port))
    pooler.stop()
    trusted = shutil.copy(ca, os.path.join(pooler.work, 'postgres-ca.crt'))  # where PgBouncer's user can read it
    if os.geteuid() == 0:
        shutil.chown(trusted, 'nobody')
    config = pooler.command[-1]
    with open(config) as f:
        text = f.read()
    assert '\nserver_tls_sslmode = disable\n' in text  # loopback on the database's VM: plain, as shipped
    with open(config, 'w') as f:
        f.write(text.replace('\nserver_tls_sslmode = disable\n',
                             f'\nserver_tls_sslmode = verify-full\nserver_tls_ca_file = {trusted}\n'))
    pooler.start()
    return pooler


def test_pgbouncer_checks_the_certificate_of_a_postgresql_on_another_machine(postgres_elsewhere):
    pooler = pooler_in_front_of(postgres_elsewhere, ca=postgres_elsewhere[1])
    try:
        with psycopg2.connect(f'postgresql://people_app:secret@127.0.0.1:{pooler.port}/postgres?sslmode=verify-full&'
                              f'sslrootcert={pooler.work}/pgbouncer.crt', connect_timeout=3) as connection:
            cursor = connection.cursor()
            cursor.execute('SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()')
            assert cursor.fetchone() in ((True, 'TLSv1.2'), (True, 'TLSv1.3'))  # the pooler's server connection
        connection.close()
    finally:
        pooler.remove()


def test_pgbouncer_refuses_a_postgresql_whose_certificate_it_does_not_trust(postgres_elsewhere, tmp_path):
    pooler = pooler_in_front_of(postgres_elsewhere, ca=other_ca(tmp_path))
    try:
        with pytest.raises(psycopg2.OperationalError):
            psycopg2.connect(f'postgresql://people_app:secret@127.0.0.1:{pooler.port}/postgres?sslmode=verify-full&'
                             f'sslrootcert={pooler.work}/pgbouncer.crt', connect_timeout=3).cursor().execute('SELECT 1')
        with open(os.path.join(pooler.work, 'pgbouncer.log')) as f:
            assert 'certificate verify failed' in f.read()
    finally:
        pooler.remove()
