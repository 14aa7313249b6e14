"""schema.sql is the one definition of the table: the Peewee model and the field rules must agree
with what it creates, on SQLite and on PostgreSQL, and creating it again never loses data."""
import os
import subprocess
import sys

import peewee
import pytest

import models
import storage
from conftest import ROOT
from models import FIELDS, Person

# The column type each Peewee field stands for, as each backend reports it.
TYPE_FAMILIES = {'BIGAUTO': {'integer', 'bigint'}, 'INT': {'integer'}, 'TEXT': {'text'}, 'BIGINT': {'bigint'}}


@pytest.mark.parametrize('model', [Person, models.Token, models.IdempotencyKey])
def test_model_matches_schema(app, model):
    db = models.database.obj
    columns = {c.name: c for c in db.get_columns(model._meta.table_name)}
    fields = model._meta.sorted_fields
    assert [f.column_name for f in fields] == list(columns)
    for field in fields:
        column = columns[field.column_name]
        assert column.data_type.lower() in TYPE_FAMILIES[field.field_type], field.name
        assert column.primary_key == field.primary_key, field.name
        if not field.primary_key:  # SQLite reports its INTEGER PRIMARY KEY as nullable; it never is
            assert column.null == field.null, field.name


def test_representation_fields_match_rules():
    assert [f.name for f in Person._meta.sorted_fields] == ['id', *FIELDS, 'version']


def insert_raw(db, **values):
    fields = {'name': 'p', 'age': 1, 'locale': 'x', **values}
    with db.atomic():
        db.execute_sql(f'INSERT INTO people (name, age, locale) VALUES ({db.param}, {db.param}, {db.param})',
                       (fields['name'], fields['age'], fields['locale']))


@pytest.mark.parametrize('field', ['name', 'locale'])
def test_schema_checks_string_lengths_like_the_rules(app, field):
    db, rule = models.database.obj, FIELDS[field]
    insert_raw(db, **{field: 'x' * rule['maxLength']})
    insert_raw(db, **{field: 'x' * rule['minLength']})
    for bad in ('x' * (rule['maxLength'] + 1), 'x' * (rule['minLength'] - 1)):
        with pytest.raises(peewee.IntegrityError):
            insert_raw(db, **{field: bad})


def test_schema_checks_age_range_like_the_rules(app):
    db, rule = models.database.obj, FIELDS['age']
    insert_raw(db, age=rule['minimum'])
    insert_raw(db, age=rule['maximum'])
    for bad in (rule['minimum'] - 1, rule['maximum'] + 1):
        with pytest.raises(peewee.IntegrityError):
            insert_raw(db, age=bad)


def test_database_never_reuses_ids(app, database_url):
    db = models.database.obj
    insert_raw(db)
    insert_raw(db)
    db.execute_sql('DELETE FROM people WHERE id = 2')
    insert_raw(db)
    assert [row[0] for row in db.execute_sql('SELECT id FROM people ORDER BY id')] == [1, 3]
    if database_url.startswith('postgresql'):  # GENERATED ALWAYS: only the database picks ids
        with pytest.raises(peewee.ProgrammingError):
            with db.atomic():
                db.execute_sql("INSERT INTO people (id, name, age, locale) VALUES (77, 'p', 1, 'x')")


def test_init_db_twice_keeps_data(client, database_url):
    client.post_json('/resources/data/', {'name': 'kept', 'age': 1, 'locale': 'x'})
    models.database.close()
    for _ in range(2):
        subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, check=True,
                       env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'}, capture_output=True)
    assert client.get('/resources/data/1').json['name'] == 'kept'


def test_least_privilege_role_from_the_readme_can_serve(pg_schema, tmp_path):
    """The README's grants are enough to serve (and to start: CREATE TABLE IF NOT EXISTS on
    existing tables), and not enough to drop or alter anything."""
    import re
    import urllib.request
    import uuid

    import webtest

    from conftest import PG_URL, Server, pg_url_in
    from service import Config, create_app

    admin, schema = pg_schema
    with open(os.path.join(ROOT, 'README.md')) as f:
        # the block of step 4 of "Deploy with PostgreSQL", indented in its list item
        grants = re.search(r'```sql\n\s*(GRANT CONNECT ON DATABASE people TO people_app.*?)```', f.read(), re.S)[1]
    role = 'people_app_' + uuid.uuid4().hex[:8]
    owner_db = storage.open_database(pg_url_in(schema))
    storage.create_schema(owner_db)  # the owner creates the tables once
    owner_db.execute_sql('DROP INDEX people_name')  # as in a database made before the index existed
    owner_db.close()
    grants = f'CREATE ROLE {role} LOGIN; ' + (grants.replace('people_app', role)  # createuser, in the README
              .replace('DATABASE people', 'DATABASE test').replace('SCHEMA public', f'SCHEMA {schema}'))
    cursor = admin.cursor()
    try:
        cursor.execute(f'SET search_path TO {schema}; {grants}; RESET search_path')
        url = pg_url_in(schema, PG_URL.replace('postgres@', f'{role}@'))
        app = create_app(Config(environ={'PEOPLE_AUTH': 'off'}, database_url=url, metrics_dir=str(tmp_path)))
        missing = storage.create_schema(models.database.obj)  # what serve does at start
        assert missing == ['CREATE INDEX IF NOT EXISTS people_name ON people (name, id)']
        client = webtest.TestApp(app)
        person = client.post_json('/resources/data/', {'name': 'p', 'age': 1, 'locale': 'x'}).json
        client.patch_json(f"/resources/data/{person['id']}", {'age': 2})
        client.delete(f"/resources/data/{person['id']}")
        models.create_token('least', 'read', 60)
        assert models.People(models.database.obj).find_token(models.hash_secret('nope')) is None
        with pytest.raises(peewee.ProgrammingError):
            with models.database.obj.atomic():
                models.database.obj.execute_sql('DROP TABLE people')
        models.database.close()
        server = Server(url, workers=1)  # serve starts, and says what is missing and how to add it
        try:
            assert urllib.request.urlopen(server.url + '/resources/data/?name=p', timeout=10).status == 200
        finally:
            server.stop()
        assert 'index missing' in server.output() and 'people_name ON people (name, id)' in server.output()
        backup = subprocess.run([sys.executable, 'service.py', 'backup', str(tmp_path / 'people.backup')], cwd=ROOT,
                                env={**os.environ, 'DATABASE_URL': url}, capture_output=True, text=True)
        assert backup.returncode == 0, backup.stderr  # what the daily backup does with the service's role
    finally:
        models.database.close()
        cursor.execute(f"SELECT 1 FROM pg_roles WHERE rolname = '{role}'")
        if cursor.fetchone():
            cursor.execute(f'DROP OWNED BY {role}; DROP ROLE {role}')


def test_least_privilege_role_on_an_empty_database_is_told_to_run_init_db_as_the_owner(pg_schema, tmp_path):
    import uuid

    from conftest import PG_URL, free_port, pg_url_in

    admin, schema = pg_schema
    empty = 'people_empty_' + uuid.uuid4().hex[:8]  # a schema without the tables, as a new database is
    role = 'people_app_' + uuid.uuid4().hex[:8]
    cursor = admin.cursor()
    cursor.execute(f'CREATE SCHEMA {empty}; CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {empty} TO {role}')
    try:
        url = pg_url_in(empty, PG_URL.replace('postgres@', f'{role}@'))
        environ = {'DATABASE_URL': url, 'PATH': '/usr/bin:/bin', 'TMPDIR': str(tmp_path), 'PEOPLE_AUTH': 'off'}
        result = subprocess.run([sys.executable, 'service.py', 'serve', '--port', str(free_port())], cwd=ROOT,
                                env=environ, capture_output=True, text=True, timeout=30)
        assert result.returncode == 1 and result.stderr.count('\n') == 1, result.stderr
        assert 'permission denied' in result.stderr and 'init-db" once as the database owner' in result.stderr
        assert os.listdir(tmp_path) == []  # nothing left behind
    finally:
        cursor.execute(f'DROP SCHEMA {empty} CASCADE; DROP OWNED BY {role}; DROP ROLE {role}')
