"""Heroku and Elastic Beanstalk, run here as far as they can be without the platforms: their nginx
configuration with Debian's nginx, in front of the web process their Procfile names."""
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from urllib.parse import urlsplit

import yaml

from conftest import ROOT, free_ports
from resources import MAX_BODY
from test_deploy import require

PLATFORM = os.path.join(ROOT, '.platform')
EB_SERVER = os.path.join(PLATFORM, 'nginx', 'conf.d', 'elasticbeanstalk', '00_application.conf')
NGINX = shutil.which('nginx') or '/usr/sbin/nginx'


def render_erb(path, environ):
    """What the nginx buildpack's `erb` makes of config/nginx.conf.erb, for the three forms it uses."""
    with open(path) as f:
        text = f.read()
    text = re.sub(r'<%= ENV\["(\w+)"\] %>', lambda m: environ[m[1]], text)
    text = re.sub(r'<%= ENV\.fetch\("(\w+)", "([^"]*)"\) %>', lambda m: environ.get(m[1], m[2]), text)
    text = re.sub(r'<%= File\.read\("([^"]+)"\) %>', lambda m: open(os.path.join(ROOT, m[1])).read(), text)
    assert '<%' not in text, 'an erb form this renderer does not know'
    return text


def wait_for(condition, seconds, process=None):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f'not ready within {seconds} s'
        assert process is None or process.poll() is None, f'{process.args} exited with {process.returncode}'
        time.sleep(0.05)


def listens(port):
    try:
        http.client.HTTPConnection('127.0.0.1', port, timeout=1).request('GET', '/livez')
        return True
    except OSError:
        return False


def call(port, method, path, body=None, token=None):
    connection = http.client.HTTPConnection('127.0.0.1', port, timeout=10)
    headers = {'Content-Type': 'application/json', **({'Authorization': f'Bearer {token}'} if token else {})}
    connection.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body, headers=headers)
    response = connection.getresponse()
    return response.status, response.getheader('Content-Type'), response.read()


def service(*args, environ):
    return subprocess.run([sys.executable, 'service.py', *args], cwd=ROOT, env=environ, check=True,
                          capture_output=True, text=True).stdout.strip()


def serves_behind_its_proxy(port, environ):
    """A token refused and one accepted, a create read back, and nginx's own refusals as problem+json."""
    status, kind, _ = call(port, 'GET', '/resources/data/')
    assert (status, kind) == (401, 'application/problem+json')
    token = service('token', 'create', '--name', 'platform', '--scope', 'write', environ=environ)
    status, _, body = call(port, 'POST', '/resources/data/', {'name': 'Ada', 'age': 36, 'locale': 'en'}, token)
    assert status == 201, body
    created = json.loads(body)
    assert json.loads(call(port, 'GET', f"/resources/data/{created['id']}", token=token)[2]) == created
    status, kind, body = call(port, 'POST', '/resources/data/', 'x' * (MAX_BODY + 1), token)
    assert (status, kind, json.loads(body)['title']) == (413, 'application/problem+json', 'Content Too Large')
    status, kind, body = call(port, 'GET', '/metrics')
    assert (status, kind, json.loads(body)['status']) == (404, 'application/problem+json', 404)


def stop(process):
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return process.wait()


# -- Heroku ---------------------------------------------------------------------------------------

def procfile(name):
    with open(os.path.join(ROOT, 'Procfile')) as f:
        return dict(line.split(': ', 1) for line in f.read().splitlines() if line)[name]


def test_heroku_procfile_serves_behind_nginx_with_a_postgres_url_that_requires_tls(pooler, tmp_path):
    """The release phase (init-db), then the web process as the nginx buildpack starts it: the app
    command, /tmp/app-initialized awaited, then nginx on $PORT from config/nginx.conf.erb. Heroku's
    DATABASE_URL is postgres://...?sslmode=require: PgBouncer here requires TLS of its clients."""
    require('nginx', 'REQUIRE_NGINX')
    pooler.admin.cursor().execute('DROP TABLE IF EXISTS people, tokens, idempotency_keys')
    url = urlsplit(pooler.url)._replace(scheme='postgres', query='sslmode=require').geturl()
    port, app_port = free_ports(2)
    environ = {**os.environ, 'DATABASE_URL': url, 'PORT': str(port), 'APP_PORT': str(app_port),
               'APP_INITIALIZED': str(tmp_path / 'app-initialized'),
               'PATH': os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']}
    environ.pop('PEOPLE_AUTH', None)
    assert procfile('release') == 'python service.py init-db'
    subprocess.run(procfile('release').split(), cwd=ROOT, env=environ, check=True, capture_output=True)
    start_nginx, app = procfile('web').split(' ', 1)
    assert start_nginx == 'bin/start-nginx'
    (tmp_path / 'logs' / 'nginx').mkdir(parents=True)
    (tmp_path / 'nginx.conf').write_text(render_erb(os.path.join(ROOT, 'config', 'nginx.conf.erb'), environ))
    started = time.monotonic()
    web = subprocess.Popen(app.split(), cwd=ROOT, env=environ, start_new_session=True)
    nginx = None
    try:
        wait_for((tmp_path / 'app-initialized').exists, 60, web)  # Heroku's boot timeout
        assert listens(app_port)  # the file comes only once the service answers
        booted = time.monotonic() - started
        nginx = subprocess.Popen([NGINX, '-p', str(tmp_path), '-c', str(tmp_path / 'nginx.conf')],
                                 start_new_session=True)
        wait_for(lambda: listens(port), 10, nginx)
        assert booted < 10, f'booted in {booted:.1f} s'
        serves_behind_its_proxy(port, environ)
        assert stop(web) == 0  # Heroku stops a dyno with SIGTERM to every process
        status, kind, body = call(port, 'GET', '/resources/data/')
        assert (status, kind, json.loads(body)['title']) == (503, 'application/problem+json', 'Service Unavailable')
    finally:
        stop(web)
        if nginx:
            stop(nginx)


def test_app_json_provisions_postgres_and_the_buildpacks_the_procfile_needs():
    with open(os.path.join(ROOT, 'app.json')) as f:
        app = json.load(f)
    assert [b['url'] for b in app['buildpacks']] == ['heroku-community/apt', 'heroku/python', 'heroku-community/nginx']
    assert app['addons'] == [{'plan': 'heroku-postgresql', 'as': 'DATABASE'}]
    with open(os.path.join(ROOT, 'Aptfile')) as f:
        assert f.read().split() == ['libev-dev']  # bjoern's build, on the apt buildpack


# -- Elastic Beanstalk ----------------------------------------------------------------------------

# The shape of the nginx.conf of Elastic Beanstalk's Amazon Linux 2023 platforms, paths aside: the
# .platform/nginx/conf.d files land in conf.d/, and the elasticbeanstalk/ ones inside server{}.
EB_NGINX_CONF = '''
error_log {work}/error.log warn;
pid {work}/nginx.pid;
worker_processes auto;
events {{ worker_connections 1024; }}
http {{
    server_tokens off;
    default_type application/octet-stream;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    log_format main '$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent';
    include {work}/conf.d/*.conf;
    map $http_upgrade $connection_upgrade {{
        default "upgrade";
    }}
    server {{
        listen 127.0.0.1:{port} default_server;
        access_log {work}/access.log main;
        client_header_timeout 60;
        client_body_timeout 60;
        keepalive_timeout 60;
        gzip off;
        include {work}/conf.d/elasticbeanstalk/*.conf;
    }}
}}
'''


def eb_web_command():
    """The web process the prebuild hook writes into EB's Procfile."""
    with open(os.path.join(PLATFORM, 'hooks', 'prebuild', '01_people.sh')) as f:
        return re.search(r"printf 'web: (.+)\\n' > Procfile", f.read())[1]


def test_elastic_beanstalk_snippets_pass_nginx_t_and_serve_the_procfile_web_process(tmp_path):
    require('nginx', 'REQUIRE_NGINX')
    port, app_port = free_ports(2)
    shutil.copytree(os.path.join(PLATFORM, 'nginx', 'conf.d'), tmp_path / 'conf.d')
    upstream = tmp_path / 'conf.d' / 'people-upstream.conf'
    assert '127.0.0.1:8000 ' in upstream.read_text()  # the platform's PORT for the web process
    upstream.write_text(upstream.read_text().replace('127.0.0.1:8000 ', f'127.0.0.1:{app_port} '))
    conf = tmp_path / 'nginx.conf'
    conf.write_text(EB_NGINX_CONF.format(work=tmp_path, port=port))
    checked = subprocess.run([NGINX, '-t', '-p', str(tmp_path), '-c', str(conf)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    environ = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/people.db', 'PORT': str(app_port)}
    environ.pop('PEOPLE_AUTH', None)
    service('init-db', environ=environ)  # .ebextensions' container command, as the leader runs it
    command = eb_web_command().split()
    assert command[0] == 'python'
    web = subprocess.Popen([sys.executable, *command[1:]], cwd=ROOT, env=environ, start_new_session=True)
    nginx = subprocess.Popen([NGINX, '-p', str(tmp_path), '-c', str(conf)], start_new_session=True)
    try:
        wait_for(lambda: listens(app_port), 15, web)
        wait_for(lambda: listens(port), 10, nginx)
        serves_behind_its_proxy(port, environ)
        assert stop(web) == 0
    finally:
        stop(web)
        stop(nginx)


def test_elastic_beanstalk_scales_out_at_80_percent_cpu_and_makes_the_schema_once():
    with open(os.path.join(ROOT, '.ebextensions', 'people.config')) as f:
        config = yaml.safe_load(f)
    trigger = config['option_settings']['aws:autoscaling:trigger']
    assert (trigger['MeasureName'], trigger['Statistic'], trigger['UpperThreshold']) == ('CPUUtilization', 'Average', 80)
    assert config['option_settings']['aws:elasticbeanstalk:application']['Application Healthcheck URL'] == '/readyz'
    init_db = config['container_commands']['01_init_db']
    assert init_db['leader_only'] is True and init_db['command'].endswith('python service.py init-db')


def directives(text):
    return dict(re.findall(r'^\s*(client_max_body_size|client_body_buffer_size|proxy_read_timeout|send_timeout|'
                           r'proxy_request_buffering|proxy_buffering|lingering_time) (\S+);', text, re.M))


def test_the_platforms_limits_and_error_titles_are_the_vm_sites():
    """One source each: the platform snippets carry deploy/nginx-people.conf's limits and titles."""
    with open(os.path.join(ROOT, 'deploy', 'nginx-people.conf')) as f:
        site = f.read()
    with open(EB_SERVER) as f:
        server = f.read()
    with open(os.path.join(PLATFORM, 'nginx', 'conf.d', 'people.conf')) as f:
        maps = f.read()
    assert len(directives(server)) == 7 and directives(server) == directives(site)

    def titles(text):
        block = re.search(r'map \$status \$people_problem_title \{(.*?)\}', text, re.S)[1]
        return dict(re.findall(r'^\s*(\w+) "([^"]+)";', block, re.M))
    platform = titles(maps)
    assert len(platform) > 5 and platform == {k: v for k, v in titles(site).items() if k in platform}
