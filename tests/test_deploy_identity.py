"""Who may touch what on the VM: backups written by an identity of their own, out of the service's reach
(the units, install.sh, and the modes tried with setpriv); people-admin reading people.env as systemd does;
the runtime packages installed by hash."""
import grp
import json
import os
import pwd
import random
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT

DEPLOY = os.path.join(ROOT, 'deploy')
SYSTEM_PYTHON = '/usr/bin/python3'  # one every uid may run (this venv's may live under /root)


def read(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return f.read()


def unit_settings(name):
    """Each key of a unit's lines with its values, in order (Environment= split into its assignments)."""
    settings = {}
    for key, value in re.findall(r'^(\w+)=(.*)$', read(name), re.M):
        settings.setdefault(key, []).extend(value.split() if key == 'Environment' else [value])
    return settings


def environment_of(name):
    return dict(assignment.split('=', 1) for assignment in unit_settings(name)['Environment'])


def installed_database():
    """install.sh's `install -o people -g people -m MODE /dev/null PATH`: the SQLite file, as (mode, path)."""
    found = re.findall(r'install -o people -g people -m (\d+) /dev/null (\S+)$', read('install.sh'), re.M)
    assert len(found) == 1, found
    return int(found[0][0], 8), found[0][1]


def installed_directory(owner):
    """install.sh's `install -d -o OWNER -g GROUP -m MODE PATH`, as (group, mode, path)."""
    found = re.findall(rf'^install -d -o {owner} -g (\S+) -m (\d+) (\S+)$', read('install.sh'), re.M)
    assert len(found) == 1, found
    group, mode, path = found[0]
    return group, int(mode, 8), path


# -- the backups' own identity -------------------------------------------------------------------

def test_backup_unit_runs_as_a_user_install_makes_that_is_not_the_services():
    service, backup = unit_settings('people.service'), unit_settings('people-backup.service')
    assert service['User'] == ['people'] and backup['User'] == ['people-backup']
    assert backup['Group'] == service['Group'] == ['people']  # the SQLite file and the backups' directory
    assert re.search(r'useradd --system .*--gid people .* people-backup$', read('install.sh'), re.M)


def test_service_may_only_read_the_backup_directory():
    """The service lists the directory the backups go to (its /metrics), by its group, never by its owner,
    and its unit mounts it read-only; nothing makes it writable for the service."""
    service, backup = unit_settings('people.service'), unit_settings('people-backup.service')
    directory = environment_of('people.service')['BACKUP_DIR']
    assert directory == environment_of('people-backup.service')['BACKUP_DIR'] == '/var/lib/people-backups'
    group, mode, path = installed_directory('people-backup')
    assert (path, group) == (directory, 'people') and mode & 0o7027 == 0 and mode & 0o050 == 0o050
    assert backup['StateDirectory'] == ['people-backups'] and int(backup['StateDirectoryMode'][0], 8) == mode
    assert f'-{directory}' in service['ReadOnlyPaths']
    writable = service.get('ReadWritePaths', []) + [f'/var/lib/{name}' for name in service['StateDirectory']]
    assert not any(f'{directory}/'.startswith(f'{path.lstrip("-")}/') for path in writable)


def free_ids(count):
    """Ids that no user or group has here: a stand-in for people and people-backup, made by no useradd."""
    taken = {user.pw_uid for user in pwd.getpwall()} | {group.gr_gid for group in grp.getgrall()}
    return [number for number in range(61000, 62000) if number not in taken][:count]


def as_ids(uid, gid, umask, code, *args):
    """Python `code` run as uid:gid (no other group) with `umask`."""
    return run_as(uid, gid, SYSTEM_PYTHON, '-c', f'import os; os.umask({umask}); {code}', *args)


def run_as(uid, gid, *command, **options):
    require_setpriv()
    return subprocess.run(['setpriv', f'--reuid={uid}', f'--regid={gid}', '--clear-groups', *command],
                          capture_output=True, text=True, timeout=30, **options)


def require_setpriv():
    if os.geteuid() != 0 or not shutil.which('setpriv') or not os.path.exists(SYSTEM_PYTHON):
        pytest.skip('needs root, setpriv (util-linux) and /usr/bin/python3, to act as other uids')


@pytest.fixture
def shared_tmp():
    """A directory every uid may traverse (pytest's is root's alone)."""
    path = tempfile.mkdtemp(prefix='people-identity-')
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path)


def make_directory(path, uid, gid, mode):
    os.mkdir(path)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def umask_of(unit):
    return int(unit_settings(unit)['UMask'][0], 8)


# What backups.take does to write a backup: a 0600 temporary file renamed into place, then its checksum.
WRITE_BACKUP = '''import sys, tempfile
fd, partial = tempfile.mkstemp(dir=sys.argv[1])
os.write(fd, b"SQLite format 3\\0"); os.close(fd); os.replace(partial, sys.argv[2])
open(sys.argv[2] + ".sha256", "w").write("0" * 64 + "\\n")'''

# Every way to change what the backup directory holds, each answered "done" or by its errno.
ATTEMPTS = '''import errno, json, sys
directory, backup, elsewhere = sys.argv[1:]
def attempt(action):
    try:
        action()
        return "done"
    except OSError as error:
        return errno.errorcode[error.errno]
print(json.dumps({
    "list": attempt(lambda: os.listdir(directory)),
    "stat": attempt(lambda: os.stat(backup)),
    "write": attempt(lambda: open(backup, "r+b").close()),
    "touch": attempt(lambda: os.utime(backup)),
    "chmod": attempt(lambda: os.chmod(backup, 0o666)),
    "replace": attempt(lambda: os.replace(elsewhere, backup)),
    "delete checksum": attempt(lambda: os.unlink(backup + ".sha256")),
    "delete": attempt(lambda: os.unlink(backup)),
    "create": attempt(lambda: open(os.path.join(directory, "people-20990101T000000Z.backup"), "x").close()),
}))'''


def test_service_user_can_list_backups_but_not_change_one(shared_tmp):
    """The backup directory as install.sh makes it, a backup written into it as people-backup.service
    writes one (its umask); then the service's uid tries every change, and the backup's uid does them."""
    service_uid, backup_uid, people_gid = free_ids(3)
    directory = make_directory(os.path.join(shared_tmp, 'backups'), backup_uid, people_gid,
                               installed_directory('people-backup')[1])
    backup = os.path.join(directory, 'people-x.backup')
    made = as_ids(backup_uid, people_gid, umask_of('people-backup.service'), WRITE_BACKUP, directory, backup)
    assert made.returncode == 0, made.stderr
    scratch = os.path.join(shared_tmp, 'scratch')  # where anyone may make the file to put in a backup's place
    os.mkdir(scratch)
    os.chmod(scratch, 0o777)
    elsewhere = os.path.join(scratch, 'forged.backup')
    open(elsewhere, 'w').close()
    os.chown(elsewhere, service_uid, people_gid)

    service = as_ids(service_uid, people_gid, umask_of('people.service'), ATTEMPTS, directory, backup, elsewhere)
    assert service.returncode == 0, service.stderr
    assert json.loads(service.stdout) == {
        'list': 'done', 'stat': 'done', 'write': 'EACCES', 'touch': 'EACCES', 'chmod': 'EPERM',
        'replace': 'EACCES', 'delete checksum': 'EACCES', 'delete': 'EACCES', 'create': 'EACCES'}
    owner = as_ids(backup_uid, people_gid, 0o077, ATTEMPTS, directory, backup, elsewhere)  # the probe can succeed
    assert owner.returncode == 0 and set(json.loads(owner.stdout).values()) == {'done'}, owner.stdout + owner.stderr


# The service's side of SQLite: its database in WAL mode, a connection held open until stdin closes.
SERVE = '''import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=wal"); db.execute("CREATE TABLE IF NOT EXISTS people (name)")
db.execute("INSERT INTO people VALUES ('p')")
print("serving", flush=True); sys.stdin.read()'''
# What backups.take does on SQLite: the online backup API from a connection to the live file.
BACK_UP = '''import sqlite3, sys
target = sqlite3.connect(sys.argv[2]); sqlite3.connect(sys.argv[1]).backup(target)
print(target.execute("SELECT count(*) FROM people").fetchone()[0])'''


@pytest.fixture
def state(shared_tmp):
    """/var/lib/people as people.service and install.sh make it, for uids standing in for people and
    people-backup: the database (empty, as install.sh leaves it) and the backups' directory."""
    service_uid, backup_uid, people_gid = free_ids(3)
    directory = make_directory(os.path.join(shared_tmp, 'people'), service_uid, people_gid,
                               int(unit_settings('people.service')['StateDirectoryMode'][0], 8))
    mode, path = installed_database()
    database = os.path.join(directory, os.path.basename(path))
    open(database, 'w').close()
    os.chown(database, service_uid, people_gid)
    os.chmod(database, mode)
    backups = make_directory(os.path.join(shared_tmp, 'backups'), backup_uid, people_gid,
                             installed_directory('people-backup')[1])
    return service_uid, backup_uid, people_gid, database, backups


# The service's side of SQLite: its database in WAL mode, a connection held open until stdin closes.
SERVE = '''import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=wal"); db.execute("CREATE TABLE IF NOT EXISTS people (name)")
db.execute("INSERT INTO people VALUES ('p')")
print("serving", flush=True); sys.stdin.read()'''
# What backups.take does on SQLite: the online backup API from a connection to the live file.
BACK_UP = '''import sqlite3, sys
target = sqlite3.connect(sys.argv[2]); sqlite3.connect(sys.argv[1]).backup(target)
print(target.execute("SELECT count(*) FROM people").fetchone()[0])'''


@pytest.mark.parametrize('serving', [True, False], ids=['service-running', 'service-stopped'])
def test_backup_user_backs_up_the_services_sqlite_file(state, serving):
    """The backup's uid, in the service's group, takes a backup while the service holds the file (and its
    -shm) open, or from the file alone; the service then writes on: nothing the backup made or left in
    /var/lib/people is closed to it."""
    service_uid, backup_uid, people_gid, database, backups = state
    service_umask, backup_umask = umask_of('people.service'), umask_of('people-backup.service')
    serve = subprocess.Popen(['setpriv', f'--reuid={service_uid}', f'--regid={people_gid}', '--clear-groups',
                              SYSTEM_PYTHON, '-c', f'import os; os.umask({service_umask}); {SERVE}', database],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert serve.stdout.readline() == 'serving\n'
        if not serving:
            serve.communicate('', timeout=10)
        taken = as_ids(backup_uid, people_gid, backup_umask, BACK_UP, database, os.path.join(backups, 'x.backup'))
        assert (taken.returncode, taken.stdout) == (0, '1\n'), taken.stderr
    finally:
        if serve.poll() is None:
            serve.communicate('', timeout=10)
    again = as_ids(service_uid, people_gid, service_umask, SERVE.replace('sys.stdin.read()', ''), database)
    assert again.returncode == 0, again.stderr


def test_people_backup_refuses_a_database_the_services_group_cannot_write(state):
    """SQLite's own mode for a new file (0644 less the umask): the -shm the backup would make from it would
    shut the service out, so deploy/people-backup stops before it opens the database."""
    service_uid, backup_uid, people_gid, database, backups = state
    os.chmod(database, 0o640)
    refused = run_as(backup_uid, people_gid, 'sh', os.path.join(DEPLOY, 'people-backup'),
                     env={'PATH': '/usr/bin:/bin', 'DATABASE_URL': f'sqlite:///{database}', 'BACKUP_DIR': backups,
                          'PYTHON': '/bin/false'})
    assert refused.returncode == 1 and f'{database} must exist and be writable' in refused.stderr
    assert os.listdir(os.path.dirname(database)) == ['people.db']


def test_people_backup_prunes_each_checksum_with_its_backup(tmp_path):
    backups = tmp_path / 'backups'
    backups.mkdir()
    for day in range(1, 4):
        for suffix in ('', '.sha256'):
            (backups / f'people-2020010{day}T000000Z.backup{suffix}').write_text('old')
    environ = {**os.environ, 'DATABASE_URL': f'sqlite:///{tmp_path}/people.db', 'BACKUP_DIR': str(backups),
               'BACKUP_KEEP': '2', 'PYTHON': sys.executable}
    subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, env=environ, check=True, capture_output=True)
    result = subprocess.run([os.path.join(DEPLOY, 'people-backup')], cwd=ROOT, env=environ, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    left = sorted(os.listdir(backups))
    assert [name for name in left if name.startswith('people-2020')] == [
        'people-20200103T000000Z.backup', 'people-20200103T000000Z.backup.sha256']
    assert len([name for name in left if name.endswith('.backup')]) == 2


# -- people.env, read as systemd reads it ---------------------------------------------------------

# The README's cases, each value as systemd.exec(5) says EnvironmentFile= reads it: no expansion, no
# command run; leading quotes as a shell's; backslash escapes; # a comment only at a line's start.
PEOPLE_ENV = r'''# a comment
; PEOPLE_COMMENTED=also a comment
PEOPLE_DOLLAR=pa$HOME${USER}$$ss
PEOPLE_BACKTICK=`touch MARKER`
PEOPLE_SUBSTITUTION=$(touch MARKER)
PEOPLE_SINGLE='a "b" $HOME \ #c'
PEOPLE_DOUBLE="a 'b' \"c\" \$HOME \` \\ \x #d"
PEOPLE_BACKSLASH=a\\b\ c\d
PEOPLE_HASH=a#b # not a comment
PEOPLE_SPACES=   inner  spaces kept   
  PEOPLE_INDENTED = value
PEOPLE_QUOTE_INSIDE=it's "fine"
PEOPLE_JOINED="a b"'c d' e
PEOPLE_MULTILINE="line one
line two"
PEOPLE_CONTINUED=one \
two
PEOPLE_URL=postgresql://people_app:p$a"s's`w#rd@db.example:5432/people
PEOPLE_EMPTY=
PEOPLE_TWICE=first
PEOPLE_TWICE=second
export PEOPLE_EXPORTED=dropped: not a name
PEOPLE_NO_EQUALS
PEOPLE_CRLF=a line ending in CR LF<CR>
PEOPLE_CR_QUOTED='a<CR>b'
'''.replace('<CR>', '\r')
EXPECTED = {
    'PEOPLE_DOLLAR': 'pa$HOME${USER}$$ss',
    'PEOPLE_BACKTICK': '`touch MARKER`',
    'PEOPLE_SUBSTITUTION': '$(touch MARKER)',
    'PEOPLE_SINGLE': 'a "b" $HOME \\ #c',
    'PEOPLE_DOUBLE': 'a \'b\' "c" $HOME ` \\ \\x #d',
    'PEOPLE_BACKSLASH': 'a\\b cd',
    'PEOPLE_HASH': 'a#b # not a comment',
    'PEOPLE_SPACES': 'inner  spaces kept',
    'PEOPLE_INDENTED': 'value',
    'PEOPLE_QUOTE_INSIDE': 'it\'s "fine"',
    'PEOPLE_JOINED': 'a bc de',  # blanks after a closing quote are dropped
    'PEOPLE_MULTILINE': 'line one\nline two',
    'PEOPLE_CONTINUED': 'one two',
    'PEOPLE_URL': 'postgresql://people_app:p$a"s\'s`w#rd@db.example:5432/people',
    'PEOPLE_EMPTY': '',
    'PEOPLE_TWICE': 'second',
    'PEOPLE_CRLF': 'a line ending in CR LF',
    'PEOPLE_CR_QUOTED': 'a\rb',
}


def people_admin_reads(tmp_path, env_file, *args):
    """The environment deploy/people-admin gives service.py (a stand-in that prints it), paths pointed here."""
    app = tmp_path / 'app'
    app.mkdir(exist_ok=True)
    (app / 'service.py').write_text('import json, os, sys\nprint(json.dumps([dict(os.environ), sys.argv[1:]]))\n')
    script = tmp_path / 'people-admin'
    script.write_text(read('people-admin').replace('[ "$(id -u)" = 0 ] && exec runuser', 'false && exec runuser')
                      .replace('/etc/people/people.env', str(env_file))
                      .replace('/opt/people/.venv/bin/python', sys.executable).replace('/opt/people', str(app)))
    result = subprocess.run(['sh', str(script), *args], capture_output=True, text=True, cwd=tmp_path,
                            env={'PATH': os.environ['PATH']})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def ours(environment, pattern='PEOPLE_'):
    return {key: value for key, value in environment.items() if key.startswith(pattern)}


def test_people_admin_reads_people_env_literally(tmp_path):
    marker = tmp_path / 'ran'
    env_file = tmp_path / 'people.env'
    env_file.write_text(PEOPLE_ENV.replace('MARKER', str(marker)))
    environment, args = people_admin_reads(tmp_path, env_file, 'token', 'list')
    expected = {key: value.replace('MARKER', str(marker)) for key, value in EXPECTED.items()}
    assert ours(environment) == expected and args == ['token', 'list']
    assert environment['DATABASE_URL'] == 'sqlite:////var/lib/people/people.db'  # people.service's default
    assert not marker.exists()


def test_people_admin_database_url_wins_over_people_env(tmp_path):
    env_file = tmp_path / 'people.env'
    env_file.write_text('DATABASE_URL="postgresql://people_app@db/people"\n')
    assert people_admin_reads(tmp_path, env_file, 'init-db')[0]['DATABASE_URL'] == 'postgresql://people_app@db/people'
    owner = 'postgresql://people_owner@db/people'
    environment, args = people_admin_reads(tmp_path, env_file, '--database-url', owner, 'init-db')
    assert environment['DATABASE_URL'] == owner and args == ['init-db']


def people_admin_environment_function():
    """The reader people-admin runs (its Python, up to where it reads the file), as a function."""
    code = re.search(r"<<'EOF'\n(.*?)\npath, override", read('people-admin'), re.S)[1]
    namespace = {}
    exec(code, namespace)
    return namespace['environment']


def random_env_file(rng):
    """Lines of the characters that matter to the format, keys from A, B, x, _ and 1."""
    return ''.join(rng.choice(['A', 'B', 'x', '_', '1', '=', '=', "'", '"', '\\', '#', ';', '$', '`', ' ', '\t',
                               '\n', '\n', '\r']) for _ in range(rng.randrange(40)))


def systemd_reads(files, workdir):
    """What systemd itself gives a service for each EnvironmentFile= in `files` (None where it starts none).
    With no systemd as PID 1 here, a user manager of our own runs one unit per file, each printing its
    environment: in a mount namespace with a private /run (the manager starts only where
    /run/systemd/system exists) and in a cgroup of its own, removed after."""
    systemd = '/usr/lib/systemd/systemd'
    if os.geteuid() != 0 or not os.path.exists(systemd) or not shutil.which('unshare'):
        pytest.skip('needs root, unshare and systemd (Debian package systemd)')
    if os.path.isdir('/run/systemd/system'):
        pytest.skip('a booted systemd runs here: compare with systemd-run -p EnvironmentFile= instead')
    roots = [root for root in ('/sys/fs/cgroup/systemd', '/sys/fs/cgroup/unified') if os.path.isdir(root)]
    cgroups = [os.path.join(root, f'people-envprobe-{os.getpid()}') for root in roots or ['/sys/fs/cgroup']]
    units = workdir / 'config' / 'systemd' / 'user'
    units.mkdir(parents=True)
    (workdir / 'run').mkdir(mode=0o700)
    for number, path in enumerate(files):
        (units / f'probe{number}.service').write_text(
            f'[Unit]\nBefore=done.service\n[Service]\nType=oneshot\nEnvironmentFile={path}\n'
            f'ExecStart=/usr/bin/env -0\nStandardOutput=file:{workdir}/out{number}\n')
    (units / 'done.service').write_text('[Unit]\nSuccessAction=exit-force\n[Service]\nType=oneshot\n'
                                        'ExecStart=/bin/true\n')
    (units / 'probe.target').write_text('[Unit]\nWants=done.service '
                                        + ' '.join(f'probe{n}.service' for n in range(len(files))) + '\n')
    start = ' '.join(f'echo $$ > {cgroup}/cgroup.procs &&' for cgroup in cgroups) + (
        ' mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/system &&'
        f' exec env -i HOME={workdir} XDG_CONFIG_HOME={workdir}/config XDG_RUNTIME_DIR={workdir}/run'
        f' PATH=/usr/bin:/bin {systemd} --user --unit=probe.target')
    try:
        for cgroup in cgroups:
            os.mkdir(cgroup)
        manager = subprocess.run(['unshare', '--mount', '--propagation', 'private', 'sh', '-c', start],
                                 capture_output=True, text=True, timeout=60)
    finally:
        for cgroup in cgroups:
            for path, _, _ in sorted(os.walk(cgroup), key=lambda entry: -entry[0].count('/')):
                os.rmdir(path)
    if manager.returncode != 0 and not any((workdir / f'out{n}').exists() for n in range(len(files))):
        pytest.skip(f'systemd --user would not run here: {manager.stderr.strip()[-300:]}')
    results = []
    for number in range(len(files)):
        out = workdir / f'out{number}'
        results.append(dict(line.split('=', 1) for line in out.read_bytes().decode().split('\0') if line)
                       if out.exists() else None)
    return results


def test_people_admin_reads_people_env_as_systemd_does(tmp_path):
    """The README's cases through people-admin, and 400 random files through its reader, against what
    systemd (252 on Debian 12) passes a service for each."""
    marker = tmp_path / 'ran'
    readme_file = tmp_path / 'people.env'
    readme_file.write_text(PEOPLE_ENV.replace('MARKER', str(marker)))
    rng = random.Random(25)
    texts = [random_env_file(rng) for _ in range(400)]
    files = []
    for number, text in enumerate(texts):
        files.append(tmp_path / f'random{number}.env')
        files[-1].write_text(text)
    systemd = systemd_reads([readme_file, *files], tmp_path / 'systemd')
    assert not marker.exists()
    assert ours(systemd[0]) == ours(people_admin_reads(tmp_path, readme_file)[0]) == {
        key: value.replace('MARKER', str(marker)) for key, value in EXPECTED.items()}
    environment = people_admin_environment_function()
    theirs = [found and {key: value for key, value in found.items() if re.fullmatch('[ABx_1]+', key)}
              for found in systemd[1:]]
    assert [(text, read, environment(text)) for text, read in zip(texts, theirs) if read != environment(text)] == []


# -- the runtime packages, by hash ----------------------------------------------------------------

def test_runtime_requirements_are_requirements_txt_pins_with_their_hashes():
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        runtime = re.findall(r'^([\w.-]+==\S+)$', f.read().split('# Tests')[0], re.M)
    hashed = read('requirements-runtime.txt')
    pins = re.findall(r'^([\w.-]+==\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)', hashed, re.M)
    assert sorted(pin for pin, _ in pins) == sorted(runtime + ['setuptools==80.9.0'])
    assert len(re.findall(r'^[\w.-]+==', hashed, re.M)) == len(pins)  # every pin has its hashes
    install = read('install.sh')
    assert '--require-hashes --no-build-isolation --use-pep517 -r "$requirements"' in install
    assert not re.search(r'pip" install(?!.*--require-hashes)', install)
