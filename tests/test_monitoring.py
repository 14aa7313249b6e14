"""Monitoring as deploy/ ships it, run for real: Debian's Prometheus scrapes `make stack` under load and
evaluates every panel of the Grafana dashboard; the blackbox exporter probes the stack's public HTTPS /readyz;
alerts go through Alertmanager to a webhook this test runs. The configs are rendered with short intervals and
free loopback ports; everything else is as shipped."""
import http.server
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import free_ports
from test_deploy import DEPLOY, Stack, require

TOOLS = {'prometheus': 'REQUIRE_PROMETHEUS', 'prometheus-alertmanager': 'REQUIRE_ALERTMANAGER',
         'amtool': 'REQUIRE_ALERTMANAGER', 'prometheus-blackbox-exporter': 'REQUIRE_BLACKBOX_EXPORTER'}
SCRAPE = 1  # seconds between scrapes and rule evaluations, in the rendered prometheus.yml
RATE_INTERVAL = f'{4 * SCRAPE}s'  # Grafana's $__rate_interval: max(4 x scrape interval, interval + scrape)
DASHBOARD = os.path.join(DEPLOY, 'grafana', 'people-dashboard.json')


def load(*path):
    with open(os.path.join(DEPLOY, *path)) as f:
        return yaml.safe_load(f)


def dump(data, path):
    with open(path, 'w') as f:
        yaml.safe_dump(data, f)
    return str(path)


def get_json(url, **params):
    with urllib.request.urlopen(url + ('?' + urllib.parse.urlencode(params) if params else ''), timeout=10) as r:
        return json.load(r)


def wait_until(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    pytest.fail(f'{what}: not within {seconds} s')


class Webhook(http.server.BaseHTTPRequestHandler):
    """Alertmanager's webhook receiver: keeps each alert it is sent."""
    alerts = []

    def do_POST(self):
        Webhook.alerts += json.loads(self.rfile.read(int(self.headers['Content-Length'])))['alerts']
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def delivered(alertname, status='firing'):
    return [a for a in Webhook.alerts if a['labels']['alertname'] == alertname and a['status'] == status]


def start(command, log, ready_url):
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    def is_ready():
        assert process.poll() is None, f'{command[0]} exited: see {log.name}'
        try:
            return urllib.request.urlopen(ready_url, timeout=2).status == 200
        except OSError:
            return False
    wait_until(is_ready, 30, f'{command[0]} ready')
    return process


@pytest.fixture(scope='module')
def monitoring(tmp_path_factory):
    """The stack on SQLite (a backup in BACKUP_DIR, for the backup-age panel) under load, and Prometheus,
    Alertmanager and the blackbox exporter with deploy/'s configs, each on a free port with its own data."""
    for tool, variable in TOOLS.items():
        require(tool, variable)
    work = tmp_path_factory.mktemp('monitoring')
    (work / 'backups').mkdir()
    (work / 'backups' / time.strftime('people-%Y%m%dT%H%M%SZ.backup', time.gmtime())).touch()
    stack = Stack(f'sqlite:///{work}/people.db', BACKUP_DIR=str(work / 'backups'))
    processes, stop_load = [], threading.Event()
    webhook = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Webhook)
    threading.Thread(target=webhook.serve_forever, daemon=True).start()
    try:
        prometheus_port, alertmanager_port, blackbox_port = free_ports(3)
        stack_files = re.search(r'files in (\S+?), deleted', stack.output())[1]

        blackbox = load('blackbox.yml')  # the stack's certificate is self-signed: verified against itself
        blackbox['modules']['people_readyz']['http']['tls_config']['ca_file'] = os.path.join(stack_files, 'cert.pem')
        alertmanager = load('alertmanager.yml')
        alertmanager['route'].update(group_wait='1s', group_interval='1s')
        alertmanager['receivers'][0]['webhook_configs'][0]['url'] = f'http://127.0.0.1:{webhook.server_port}/alerts'
        alerts = load('alerts.yml')
        for rule in alerts['groups'][0]['rules']:
            rule['for'] = f'{SCRAPE}s'
        prometheus = load('prometheus.yml')
        prometheus['global'] = {'scrape_interval': f'{SCRAPE}s', 'evaluation_interval': f'{SCRAPE}s'}
        prometheus['rule_files'] = [dump(alerts, work / 'alerts.yml')]
        prometheus['alerting']['alertmanagers'][0]['static_configs'][0]['targets'] = [f'127.0.0.1:{alertmanager_port}']
        jobs = {job['job_name']: job for job in prometheus['scrape_configs']}
        jobs['people']['static_configs'][0]['targets'] = [f'127.0.0.1:{stack.service}']
        jobs['people-probe']['static_configs'][0]['targets'] = [f'https://127.0.0.1:{stack.https}/readyz']
        jobs['people-probe']['relabel_configs'][-1]['replacement'] = f'127.0.0.1:{blackbox_port}'

        log = open(work / 'monitoring.log', 'w')
        processes.append(start(['prometheus-blackbox-exporter', f'--config.file={dump(blackbox, work / "bb.yml")}',
                                f'--web.listen-address=127.0.0.1:{blackbox_port}'], log,
                               f'http://127.0.0.1:{blackbox_port}/-/healthy'))
        processes.append(start(['prometheus-alertmanager', f'--config.file={dump(alertmanager, work / "am.yml")}',
                                f'--storage.path={work}/alertmanager', f'--web.listen-address=127.0.0.1:{alertmanager_port}',
                                '--cluster.listen-address='], log, f'http://127.0.0.1:{alertmanager_port}/-/ready'))
        processes.append(start(['prometheus', f'--config.file={dump(prometheus, work / "prometheus.yml")}',
                                f'--storage.tsdb.path={work}/prometheus', f'--web.listen-address=127.0.0.1:{prometheus_port}'],
                               log, f'http://127.0.0.1:{prometheus_port}/-/ready'))

        def load_the_stack():  # reads, creates, a 404 and a request without a token, through nginx
            while not stop_load.is_set():
                for method, path, body in (('GET', '/resources/data/', None), ('GET', '/resources/data/999999', None),
                                           ('POST', '/resources/data/', '{"name": "a", "age": 1, "locale": "x"}')):
                    try:
                        stack.request(method, path, body, {'Content-Type': 'application/json'})
                        conn = stack.connection()
                        conn.request('GET', '/resources/data/')
                        conn.getresponse().read()
                        conn.close()
                    except OSError:
                        pass  # the stack stopped (the alert test): the load ends with it
                time.sleep(0.02)
        threading.Thread(target=load_the_stack, daemon=True).start()
        stack.prometheus = f'http://127.0.0.1:{prometheus_port}'
        yield stack
    finally:
        stop_load.set()
        for process in reversed(processes):
            process.terminate()
            process.wait(10)
        webhook.shutdown()
        stack.stop()


def query(stack, expr):
    answer = get_json(stack.prometheus + '/api/v1/query', query=expr)
    assert answer['status'] == 'success', answer
    return answer['data']['result']


def panel_queries():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    return [(panel['title'], target['expr']) for panel in dashboard['panels'] for target in panel['targets']]


def as_grafana_sends_it(expr):
    return expr.replace('$__rate_interval', RATE_INTERVAL).replace('$__range', '1m').replace('$job', 'people')


def test_every_dashboard_panel_query_returns_data_from_the_live_service(monitoring):
    # The load runs meanwhile: wait for the rate windows to fill with scrapes of it.
    wait_until(lambda: query(monitoring, as_grafana_sends_it(
        'sum(rate(people_token_requests_total{job=~"$job",status="2xx"}[$__rate_interval])) > 0')), 60, 'traffic scraped')
    wait_until(lambda: query(monitoring, 'probe_success{job="people-probe"}'), 30, 'probe scraped')
    empty = [(title, expr) for title, expr in panel_queries() if not query(monitoring, as_grafana_sends_it(expr))]
    assert empty == [], empty
    # The job variable's options, as Grafana's label_values(people_build_info, job) asks for them.
    assert 'people' in get_json(monitoring.prometheus + '/api/v1/label/job/values', **{'match[]': 'people_build_info'})['data']
    tokens = {s['metric']['token'] for s in query(monitoring, 'people_token_requests_total{job="people"}')}
    assert {'-', f'stack-{monitoring.https}'} <= tokens  # by token name: the stack's token, and none


def test_the_external_probe_sees_the_stack_over_https_and_the_certificate_alert_is_delivered(monitoring):
    wait_until(lambda: query(monitoring, 'probe_success{job="people-probe"} == 1'), 30, 'the probe succeeds')
    assert query(monitoring, 'probe_http_status_code{job="people-probe"}')[0]['value'][1] == '200'
    assert query(monitoring, 'probe_http_ssl{job="people-probe"}')[0]['value'][1] == '1'
    left = float(query(monitoring, 'probe_ssl_earliest_cert_expiry{job="people-probe"} - time()')[0]['value'][1])
    assert 86400 < left <= 2 * 86400  # the stack makes a certificate of two days
    # Two days is within 14: the rule fires, and Alertmanager sends it to the webhook.
    wait_until(lambda: delivered('PeopleCertificateExpiring'), 60, 'PeopleCertificateExpiring at the webhook')


def test_stopping_the_service_delivers_people_down_to_the_webhook(monitoring):
    wait_until(lambda: query(monitoring, 'up{job="people"} == 1'), 30, 'the service scraped')
    assert delivered('PeopleDown') == []
    assert monitoring.stop() == 0
    alert = wait_until(lambda: delivered('PeopleDown'), 60, 'PeopleDown at the webhook')[0]
    assert alert['labels']['instance'] == f'127.0.0.1:{monitoring.service}' and alert['labels']['severity'] == 'page'
    wait_until(lambda: delivered('PeopleProbeFailing'), 60, 'PeopleProbeFailing at the webhook')


def test_alertmanager_config_passes_amtool():
    require('amtool', TOOLS['amtool'])
    result = subprocess.run(['amtool', 'check-config', 'alertmanager.yml'], cwd=DEPLOY, capture_output=True, text=True)
    assert result.returncode == 0 and 'SUCCESS' in result.stdout, result.stdout + result.stderr


def test_blackbox_config_passes_its_check():
    require('prometheus-blackbox-exporter', TOOLS['prometheus-blackbox-exporter'])
    result = subprocess.run(['prometheus-blackbox-exporter', '--config.check', '--config.file=blackbox.yml'], cwd=DEPLOY,
                            capture_output=True, text=True)
    assert result.returncode == 0 and 'Config file is ok' in result.stderr, result.stderr


def test_dashboard_reads_the_provisioned_datasource_with_grafanas_variables():
    with open(DASHBOARD) as f:
        dashboard = json.load(f)
    datasource = load('grafana', 'provisioning', 'datasources', 'people.yml')['datasources'][0]
    uids = {panel['datasource']['uid'] for panel in dashboard['panels']}
    uids |= {target['datasource']['uid'] for panel in dashboard['panels'] for target in panel['targets']}
    assert uids == {datasource['uid']} and datasource['type'] == 'prometheus'
    assert [variable['name'] for variable in dashboard['templating']['list']] == ['job']
    for title, expr in panel_queries():
        assert not re.search(r'\[\d+[smh]\]', expr), f'{title}: a fixed range, not $__rate_interval'
        assert 'people-probe' in expr or '$job' in expr, f'{title}: not filtered by the job variable'


def test_install_monitoring_wires_every_monitoring_file():
    """install.sh --monitoring (as root on a VM; not run here) installs each file the tests above ran."""
    with open(os.path.join(DEPLOY, 'install.sh')) as f:
        text = f.read()
    section = text[text.index('if [ "$MONITORING" = 1 ]'):]
    for name in ('prometheus.yml', 'alerts.yml', 'blackbox.yml', 'alertmanager.yml', 'grafana'):
        assert f'"$SRC/deploy/{name}"' in section, name
    assert subprocess.run(['bash', '-n', os.path.join(DEPLOY, 'install.sh')]).returncode == 0
