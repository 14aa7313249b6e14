"""Health, metrics, request ids and logs: in process, and across real bjoern workers."""
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import webtest

import models
import storage
import telemetry
from conftest import Relay, Server, pg_url_in
from service import Config, create_app

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


def samples(text):
    """{(name, labels): value} from the Prometheus text format."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith('#'):
            name_labels, value = line.rsplit(' ', 1)
            name, _, labels = name_labels.partition('{')
            found[(name, labels.rstrip('}'))] = float(value)
    return found


def make_client(tmp_path, database_url=None, **environ):
    """A client of an app configured by `environ`, on a fresh SQLite file unless told otherwise."""
    url = database_url or f'sqlite:///{tmp_path}/people.db'
    app = create_app(Config(environ={'PEOPLE_AUTH': 'off', **environ}, database_url=url,
                            metrics_dir=str(tmp_path / 'metrics')))
    if database_url is None:
        storage.create_schema(models.database.obj)
    return webtest.TestApp(app)


def requests_total(text, route='/resources/data/{id}', status='200', method='GET'):
    labels = f'method="{method}",route="{route}",status="{status}"'
    return samples(text).get(('http_requests_total', labels), 0.0)


# -- health -----------------------------------------------------------------------------------

def test_livez(client):
    assert client.get('/livez').json == {'status': 'ok'}


def test_readyz_when_database_answers(client):
    assert client.get('/readyz').json == {'status': 'ready'}


@pytest.mark.parametrize('url', ['sqlite:////nonexistent/dir/people.db', 'postgresql://postgres@127.0.0.1:1/test'])
def test_readyz_503_when_database_does_not_answer(url, tmp_path):
    response = make_client(tmp_path, url).get('/readyz', status=503)
    assert response.content_type == 'application/problem+json' and response.json['status'] == 503


# -- metrics, in process ------------------------------------------------------------------------

def test_metrics_count_each_request_by_route_template_and_status(client, person):
    before = client.get('/metrics').text
    for _ in range(7):
        client.get(f"/resources/data/{person['id']}")
    client.get('/resources/data/424242', status=404)
    after = client.get('/metrics').text
    assert requests_total(after) - requests_total(before) == 7
    assert requests_total(after, status='404') - requests_total(before, status='404') == 1
    assert '424242' not in after  # the route template, never the raw path


def test_histogram_is_cumulative_and_matches_the_count(client, person):
    for _ in range(5):
        client.get(f"/resources/data/{person['id']}")
    found = samples(client.get('/metrics').text)
    labels = 'method="GET",route="/resources/data/{id}"'
    buckets = [value for (name, l), value in found.items()
               if name == 'http_request_duration_seconds_bucket' and l.startswith(labels)]
    assert buckets == sorted(buckets) and len(buckets) == len(telemetry.BUCKETS) + 1
    assert buckets[-1] == found[('http_request_duration_seconds_count', labels)] == 5
    assert found[('http_request_duration_seconds_sum', labels)] > 0


def test_unmatched_paths_and_odd_methods_count_under_bounded_labels(client):
    for path in ('/no/such/path', '/another/missing/one'):
        client.get(path, status=404)
    client.request('/resources/data/', method='TRACE', status=405)
    text = client.get('/metrics').text
    assert requests_total(text, route='unmatched', status='404') == 2
    assert requests_total(text, route='/resources/data/', status='405', method='other') == 1
    assert 'no/such' not in text and 'TRACE' not in text


def test_probes_and_scrapes_are_not_counted(client):
    for path in ('/livez', '/readyz', '/metrics'):
        client.get(path)
    text = client.get('/metrics').text
    assert 'route="/livez"' not in text and 'route="/metrics"' not in text and 'route="/readyz"' not in text


def test_metrics_carry_start_time_and_build_info(client):
    found = samples(client.get('/metrics').text)
    assert abs(found[('people_start_time_seconds', '')] - time.time()) < 60
    assert any(name == 'people_build_info' for name, _ in found)


def test_metrics_refuse_addresses_outside_the_allow_list(client):
    response = client.get('/metrics', extra_environ={'REMOTE_ADDR': '192.0.2.7'}, status=403)
    assert response.content_type == 'application/problem+json'


def test_metrics_refuse_a_forwarded_address_that_is_not_one(tmp_path):
    client = make_client(tmp_path, PEOPLE_TRUSTED_PROXIES='127.0.0.1/32')
    response = client.get('/metrics', headers={'X-Forwarded-For': 'garbage'}, status=403)
    assert response.content_type == 'application/problem+json'


def test_database_errors_are_counted(tmp_path):
    client = make_client(tmp_path, 'sqlite:////nonexistent/x.db')
    client.get('/resources/data/1', status=503, expect_errors=True)
    found = samples(client.get('/metrics').text)
    assert found[('people_database_errors_total', 'kind="unavailable"')] == 1


def test_unwritable_metrics_directory_never_fails_a_request(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('not a directory')
    app = create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=f'sqlite:///{tmp_path}/p.db',
                            metrics_dir=str(blocker / 'm')))
    storage.create_schema(models.database.obj)
    client = webtest.TestApp(app)
    client.get('/livez', status=200, expect_errors=True)  # the failure is logged, the request served
    client.get('/resources/data/1', status=404)


def test_retire_folds_a_dead_workers_counts_into_the_archive(tmp_path):
    directory = str(tmp_path)
    for pid, amount in ((101, 3.0), (102, 4.0)):
        counts = telemetry.Counts(directory, telemetry.JsonLog())
        counts.open()
        os.rename(os.path.join(directory, f'{os.getpid()}.counts'), os.path.join(directory, f'{pid}.counts'))
        counts.add(('bucket', 'GET', '/x', 200, 0), amount)
    key = ('bucket', 'GET', '/x', 200, 0)
    assert telemetry.totals(directory)[key] == 7
    telemetry.retire(directory, 101)
    assert sorted(os.listdir(directory)) == ['102.counts', 'archive.json']
    assert telemetry.totals(directory)[key] == 7
    telemetry.retire(directory, 102)
    assert sorted(os.listdir(directory)) == ['archive.json'] and telemetry.totals(directory)[key] == 7


# -- request ids and logs -------------------------------------------------------------------------

def test_request_id_round_trips(client):
    assert client.get('/livez', headers={'X-Request-ID': 'abc-123.x'}).headers['X-Request-ID'] == 'abc-123.x'


@pytest.mark.parametrize('bad', ['x' * 129, 'with space', 'semi;colon', ''])
def test_malformed_request_id_is_replaced(client, bad):
    given = client.get('/livez', headers={'X-Request-ID': bad}).headers['X-Request-ID']
    assert given != bad and re.fullmatch(r'[0-9a-f]{12}-\d+', given)


def test_generated_request_ids_differ(client):
    assert client.get('/livez').headers['X-Request-ID'] != client.get('/livez').headers['X-Request-ID']


def test_access_log_line_is_json_with_the_request_id(tmp_path, capsys):
    client = make_client(tmp_path, ACCESS_LOG='on')
    capsys.readouterr()
    response = client.get('/resources/data/5', status=404)
    (line,) = capsys.readouterr().out.splitlines()
    entry = json.loads(line)
    assert entry['request_id'] == response.headers['X-Request-ID']
    assert entry['route'] == '/resources/data/{id}' and entry['status'] == 404 and entry['method'] == 'GET'
    assert entry['level'] == 'info' and entry['duration_ms'] >= 0 and entry['client']


def test_access_log_is_off_by_default(client, capsys):
    capsys.readouterr()
    client.get('/livez')
    assert capsys.readouterr().out == ''


def test_error_log_line_carries_cause_and_request_id(tmp_path, capsys):
    client = make_client(tmp_path, 'sqlite:////nonexistent/x.db')
    capsys.readouterr()
    response = client.get('/resources/data/1', status=503, expect_errors=True)
    entry = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert entry['level'] == 'error' and entry['request_id'] == response.headers['X-Request-ID']
    assert 'unable to open database' in entry['cause']


def test_log_level_filters(tmp_path, capsys):
    client = make_client(tmp_path, LOG_LEVEL='warning', ACCESS_LOG='on')
    capsys.readouterr()
    client.get('/livez')
    assert capsys.readouterr().out == ''


# -- across real workers ------------------------------------------------------------------------

def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_counts_are_exact_across_workers_and_survive_replacement(database_url, tmp_path):
    server = Server(database_url, workers=2, METRICS_DIR=str(tmp_path))
    try:
        before = requests_total(get(server.url + '/metrics')[1], status='404')
        for _ in range(200):  # a new connection each time: the workers share them out
            assert get(server.url + '/resources/data/77')[0] == 404
        files = [f for f in os.listdir(tmp_path) if f.endswith('.counts')]
        assert len(files) == 2  # both workers served
        assert requests_total(get(server.url + '/metrics')[1], status='404') - before == 200

        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True)
        killed = int(workers.stdout.split()[0])
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len([f for f in os.listdir(tmp_path) if f.endswith('.counts')]) != 1:
            time.sleep(0.05)
        for _ in range(50):
            assert get(server.url + '/resources/data/77')[0] == 404
        assert requests_total(get(server.url + '/metrics')[1], status='404') - before == 250
        left = [f for f in os.listdir(tmp_path) if f.endswith('.counts')]
        assert f'{killed}.counts' not in left and len(left) <= 2  # one file per live worker at most
    finally:
        server.stop()


def test_server_logs_are_json_lines(database_url):
    server = Server(database_url, workers=1, ACCESS_LOG='on')
    try:
        status, _ = get(server.url + '/resources/data/3')
    finally:
        server.stop()
    entries = [json.loads(line) for line in server.output().splitlines()]
    assert [e['event'] for e in entries if e['event'] != 'request'] == ['serving', 'draining', 'stopped']
    assert any(e['event'] == 'request' and e['status'] == status for e in entries)


def test_readyz_follows_postgresql_away_and_back(pg_schema):
    _, schema = pg_schema
    relay = Relay()
    server = Server(pg_url_in(schema, relay.url), workers=2)
    try:
        assert get(server.url + '/readyz')[0] == 200
        relay.cut()
        deadline = time.monotonic() + 10
        statuses = set()
        while time.monotonic() < deadline and statuses != {503}:
            statuses = {get(server.url + '/readyz')[0] for _ in range(4)}  # both workers notice
        assert statuses == {503}
        status, body = get(server.url + '/resources/data/1')
        assert status == 503 and json.loads(body)['status'] == 503
        relay.restore()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and statuses != {200}:
            statuses = {get(server.url + '/readyz')[0] for _ in range(4)}
        assert statuses == {200}
    finally:
        server.stop()
        relay.cut()


def test_full_metrics_filesystem_never_stops_the_service(database_url, small_filesystem):
    """A sparse counts file on a full filesystem killed a worker with SIGBUS at its first request,
    and the master died archiving a dead worker's counts with nowhere to write them."""
    directory, fill = small_filesystem
    server = Server(database_url, workers=2, METRICS_DIR=str(directory / 'metrics'))
    try:
        for _ in range(40):
            assert get(server.url + '/resources/data/77')[0] == 404
        fill()
        workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True, text=True)
        for worker in map(int, workers.stdout.split()):  # both die; the new ones find no room
            os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and server.output().count('starting another') < 2:
            time.sleep(0.05)
        for _ in range(40):
            assert get(server.url + '/resources/data/77')[0] == 404
        assert get(server.url + '/metrics')[0] == 200
        assert server.process.poll() is None
        assert "counts could not be archived" in server.output()
        assert 'metrics file unavailable' in server.output()
    finally:
        server.stop()
    assert server.process.returncode == 0
