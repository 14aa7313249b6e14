"""Bulk create: POST /resources/data/ with a JSON array makes all of its people in one statement, or none."""
import http.client
import json
import os
import signal
import subprocess
import threading
import time
from urllib.parse import quote

import jsonschema
import peewee
import pytest

import models
import storage
from conftest import Server
from resources import MAX_BATCH, MAX_BODY

PETER = {'name': 'peter', 'age': 42, 'locale': 'NYC'}


def people(count, prefix='p'):
    return [{'name': f'{prefix}{i}', 'age': i % 151, 'locale': 'NYC'} for i in range(count)]


def stored(client):
    return client.get('/resources/data/?limit=500').json['items']


def test_people_are_created_in_the_order_sent_with_ids_ascending(client):
    sent = people(7)
    items = client.post_json('/resources/data/', sent, status=201).json['items']
    assert [{k: v for k, v in item.items() if k != 'id'} for item in items] == sent
    ids = [item['id'] for item in items]
    assert ids == sorted(ids) and len(set(ids)) == 7
    assert stored(client) == items


def test_a_bad_item_is_named_by_its_index_and_nothing_is_written(client):
    sent = people(5)
    sent[3]['age'] = 151
    response = client.post_json('/resources/data/', sent, status=422)
    assert response.content_type == 'application/problem+json'
    assert response.json['errors'] == [{'pointer': '#/3/age', 'detail': 'must be between 0 and 150'}]
    assert stored(client) == []


def test_an_item_that_is_no_object_is_named(client):
    response = client.post_json('/resources/data/', [PETER, 'peter'], status=422)
    assert response.json['errors'] == [{'pointer': '#/1', 'detail': 'must be a JSON object'}]
    assert stored(client) == []


def test_a_row_the_database_refuses_rolls_back_the_whole_statement(app):
    """Past the field rules (which the API applies first), the one INSERT is still all or nothing."""
    rows = people(4)
    rows[2]['age'] = 200  # the schema's CHECK refuses it
    with pytest.raises(peewee.IntegrityError):
        models.People(models.database.obj).create(rows)
    assert models.Person.select().count() == 0


@pytest.mark.parametrize('count', [0, MAX_BATCH + 1])
def test_an_array_not_of_1_to_max_batch_people_is_refused(client, count):
    response = client.post_json('/resources/data/', people(count), status=422)
    assert response.content_type == 'application/problem+json'
    assert response.json['errors'] == [{'pointer': '#', 'detail': f'must hold 1 to {MAX_BATCH} people'}]
    assert stored(client) == []


def test_max_batch_people_of_the_longest_values_fit_in_the_body_cap(client):
    widest = {'name': '\U0001F600' * 200, 'age': 150, 'locale': '\U0001F600' * 64}  # 4 bytes a character
    body = json.dumps([widest] * MAX_BATCH, ensure_ascii=False).encode()
    assert len(body) <= MAX_BODY
    items = client.post('/resources/data/', body, content_type='application/json', status=201).json['items']
    assert len(items) == MAX_BATCH and items[-1]['id'] - items[0]['id'] >= MAX_BATCH - 1


def test_put_takes_one_person_only(client):
    response = client.put_json('/resources/data/', [PETER], status=400)
    assert response.json['detail'] == 'The body must be a JSON object.'
    assert stored(client) == []


def test_a_body_neither_object_nor_array_gives_400(client):
    response = client.post_json('/resources/data/', 42, status=400)
    assert response.json['detail'] == 'The body must be a JSON object or array.'


def test_the_form_field_may_hold_an_array(client):
    body = 'data=' + quote(json.dumps(people(2)))
    items = client.post('/resources/data/', body, content_type='application/x-www-form-urlencoded', status=201).json
    assert [item['name'] for item in items['items']] == ['p0', 'p1']


def test_same_key_and_array_answers_the_same_people_again(client):
    first = client.post_json('/resources/data/', people(3), headers={'Idempotency-Key': 'b-1'}, status=201).json
    again = client.post_json('/resources/data/', people(3), headers={'Idempotency-Key': 'b-1'}, status=201).json
    assert again == first
    assert len(stored(client)) == 3


@pytest.mark.parametrize('second', [people(3, 'q'), PETER], ids=['another array', 'one person'])
def test_same_key_with_another_body_gives_422_and_creates_nothing(client, second):
    client.post_json('/resources/data/', people(3), headers={'Idempotency-Key': 'b-2'})
    response = client.post_json('/resources/data/', second, headers={'Idempotency-Key': 'b-2'}, status=422)
    assert 'Idempotency-Key' in response.json['detail']
    assert len(stored(client)) == 3


def test_metrics_count_people_created_apart_from_requests(client):
    client.post_json('/resources/data/', people(5), headers={'Idempotency-Key': 'm'})
    client.post_json('/resources/data/', people(5), headers={'Idempotency-Key': 'm'})  # answered again: none made
    client.post_json('/resources/data/', PETER)
    metrics = client.get('/metrics').text
    assert 'people_created_total 6\n' in metrics
    assert 'http_requests_total{method="POST",route="/resources/data/",status="201"} 3\n' in metrics


def test_created_people_match_the_document(client):
    document = client.get('/openapi.json').json
    created = client.post_json('/resources/data/', people(2)).json
    jsonschema.validate(created, {**document['components']['schemas']['Created'], 'components': document['components']})
    operation = document['paths']['/resources/data/']['post']
    body = operation['requestBody']['content']['application/json']['schema']
    assert jsonschema.Draft202012Validator(body).is_valid(people(MAX_BATCH))
    assert not jsonschema.Draft202012Validator(body).is_valid(people(MAX_BATCH + 1))


def batches(port, prefix, size, stop, results):
    """Batches of `size` people named `prefix`-<n> (all of one batch share the name) until `stop`."""
    conn, n = http.client.HTTPConnection('127.0.0.1', port, timeout=10), 0
    while not stop.is_set():
        name, n = f'{prefix}-{n}', n + 1
        try:
            conn.request('POST', '/resources/data/', json.dumps([{**PETER, 'name': name}] * size),
                         {'Content-Type': 'application/json'})
            response = conn.getresponse()
            results.append((name, response.status, response.read()))
        except (OSError, http.client.HTTPException):
            results.append((name, None, None))  # the worker was killed mid-request: not acknowledged
            conn.close()
            conn = http.client.HTTPConnection('127.0.0.1', port, timeout=10)


@pytest.mark.pooler
def test_a_worker_killed_mid_batch_leaves_every_batch_whole_or_absent(database_url):
    size = 200
    server = Server(database_url, workers=2)
    results, stop = [], threading.Event()
    loops = [threading.Thread(target=batches, args=(server.port, f'k{i}', size, stop, results)) for i in range(4)]
    try:
        for t in loops:
            t.start()
        for _ in range(3):  # SIGKILL each worker in turn, under load; the master replaces it
            deadline = time.monotonic() + 10
            answered = len(results)
            while len(results) < answered + 8 and time.monotonic() < deadline:
                time.sleep(0.01)
            workers = subprocess.run(['pgrep', '-P', str(server.process.pid)], capture_output=True,
                                     text=True).stdout.split()
            for pid in workers:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass  # last round's worker: pgrep saw it as a zombie, the master reaped it since
        stop.set()
        for t in loops:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    assert any(status is None for _, status, _ in results)  # the kills did cut requests off
    db = storage.open_database(database_url)
    try:
        counts = dict(db.execute_sql('SELECT name, count(*) FROM people GROUP BY name').fetchall())
    finally:
        db.close()
    assert set(counts.values()) == {size}  # every batch whole, or not there at all
    for name, status, body in results:
        if status == 201:
            assert counts[name] == size and [p['name'] for p in json.loads(body)['items']] == [name] * size
