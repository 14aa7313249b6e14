"""Filtered lists at scale: each single filter's query uses an index, a filtered request examines a
bounded number of rows, and walking `next` still finds every match exactly once, on both backends."""
import re
import subprocess
import sys

import pytest
import webtest

import models
import storage
from conftest import ROOT
from service import Config, create_app

# A value of each filter, and the index its queries must use (a range of the primary key, for age:
# it has no index of its own; each request walks at most SCAN_LIMIT rows of the key).
SINGLE_FILTERS = {'name': ('eva 7919', 'people_name'), 'locale': ('SF', 'people_locale'),
                  'age_min': (150, 'PRIMARY KEY|people_pkey'), 'age_max': (0, 'PRIMARY KEY|people_pkey')}


def seeded(count):
    db = models.database.obj
    models.People(db).seed(1, count)
    if isinstance(db, models.PostgresqlDatabase):
        db.execute_sql('ANALYZE people')  # what autovacuum does soon after a bulk load
    return db


def plan(db, sql, params):
    if isinstance(db, models.PostgresqlDatabase):
        return [row[0] for row in db.execute_sql('EXPLAIN ' + sql, params)]
    return [row[-1] for row in db.execute_sql('EXPLAIN QUERY PLAN ' + sql, params)]


@pytest.mark.parametrize('name', SINGLE_FILTERS)
def test_single_filter_queries_use_an_index(app, name):
    db = seeded(20_000)
    people, statements = models.People(db), []
    run = people.run
    people.run = lambda sql, params, *read: statements.append((sql, params)) or run(sql, params, *read)
    value, index = SINGLE_FILTERS[name]
    people.find_page(after=0, limit=50, **{name: value})
    assert statements
    for sql, params in statements:
        steps = plan(db, sql, params)
        assert not [s for s in steps if s.startswith('SCAN people') or 'Seq Scan' in s], steps
        assert re.search(index, ' '.join(steps)), steps


def walk(client, url):
    seen, requests = [], 0
    while url:
        page = client.get(url).json
        seen += [p['id'] for p in page['items']]
        url, requests = page['next'], requests + 1
    return seen, requests


@pytest.mark.parametrize('query, condition', [
    ('name=eva%207919', "name = 'eva 7919'"),  # one of 100,000: the name index finds it at once
    ('locale=SF&age_min=150', "locale = 'SF' AND age >= 150"),  # a rare combination: bounded scans
])
def test_walk_of_a_rare_filter_finds_exactly_its_rows(client, query, condition):
    db = seeded(100_000)
    expected = [row[0] for row in db.execute_sql(f'SELECT id FROM people WHERE {condition} ORDER BY id')]
    assert 0 < len(expected) < 1000
    seen, requests = walk(client, f'/resources/data/?{query}&limit=10')
    assert seen == expected
    assert requests <= len(expected) // 10 + 100_000 // 8 // models.SCAN_LIMIT + 2


def test_walk_of_a_filter_sees_every_match_that_exists_throughout_once(client):
    db = seeded(5_000)
    match = {'name': 'w', 'age': 150, 'locale': 'SF'}
    ids = [client.post_json('/resources/data/', match).json['id'] for _ in range(5)]
    url, seen, deleted = '/resources/data/?locale=SF&age_min=150&limit=2', [], []
    while url:
        page = client.get(url).json
        seen += [p['id'] for p in page['items']]
        url = page['next']
        client.post_json('/resources/data/', match)  # rows come and go during the walk
        if len(deleted) < 3:
            deleted.append(ids[-1 - len(deleted)])
            client.delete(f'/resources/data/{deleted[-1]}')
    expected = [row[0] for row in db.execute_sql("SELECT id FROM people WHERE locale = 'SF' AND age >= 150 "
                                                  'AND id <= %d ORDER BY id' % ids[-1])]
    assert [i for i in seen if i <= ids[-1]] == expected
    assert seen == sorted(set(seen)) and not set(deleted) & set(seen)


@pytest.mark.parametrize('query', ['locale=NYC&age_min=150', 'age_min=150', 'name=ann&age_max=150&age_min=150',
                                   'name=ann&locale=NYC&age_min=150'])
def test_a_filtered_request_examines_a_bounded_number_of_rows(database_url, tmp_path, query):
    """With at most 10 rows examined per request, 30 near misses then a match take four pages:
    three empty ones, each continuing from the 10th row it examined, then the match."""
    app = create_app(Config(environ={'PEOPLE_AUTH': 'off', 'LIST_SCAN': '10'}, database_url=database_url,
                            metrics_dir=str(tmp_path / 'metrics')))
    storage.create_schema(models.database.obj)
    client = webtest.TestApp(app)
    try:
        ids = [client.post_json('/resources/data/', {'name': 'ann', 'age': 149, 'locale': 'NYC'}).json['id']
               for _ in range(30)]
        match = client.post_json('/resources/data/', {'name': 'ann', 'age': 150, 'locale': 'NYC'}).json
        url, pages = f'/resources/data/?{query}&limit=5', []
        while url:
            page = client.get(url).json
            pages.append((page['items'], url))
            url = page['next']
        assert [items for items, _ in pages] == [[], [], [], [match]]
        assert [f'after={ids[i]}&' in url for i, (_, url) in zip([9, 19, 29], pages[1:])] == [True] * 3
    finally:
        models.database.close()


def test_init_db_adds_missing_indexes_and_keeps_data(client, database_url):
    person = client.post_json('/resources/data/', {'name': 'kept', 'age': 1, 'locale': 'x'}).json
    db = models.database.obj
    with db.atomic():
        db.execute_sql('DROP INDEX people_name')  # a database made before the indexes existed
        db.execute_sql('DROP INDEX people_locale')
    models.database.close()
    subprocess.run([sys.executable, 'service.py', 'init-db'], cwd=ROOT, check=True,
                   env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'}, capture_output=True)
    assert {'people_name', 'people_locale'} <= {index.name for index in db.get_indexes('people')}
    assert client.get(f"/resources/data/{person['id']}").json == person


@pytest.mark.parametrize('query', ['age_min=150&age_max=0', 'age_min=1&age_max=0&locale=NYC', 'age_min=100&age_max=99'])
def test_a_contradictory_age_range_answers_at_once(client, query):
    """No age is in the range: one empty page with no next, not a walk of the table (10,001 requests at 1M)."""
    seeded(1000)
    assert client.get(f'/resources/data/?{query}').json == {'items': [], 'next': None}
