"""The command line beside `serve`: seeding generated people."""
import subprocess
import sys

import models
from conftest import ROOT
from models import FIELDS, validate


def test_seed_inserts_valid_people_in_batches(database_url):
    subprocess.run([sys.executable, 'service.py', 'seed', '--count', '12345'], cwd=ROOT, check=True,
                   env={'DATABASE_URL': database_url, 'PATH': '/usr/bin:/bin'}, capture_output=True)
    db = models.open_database(database_url)
    try:
        rows = db.execute_sql('SELECT id, name, age, locale FROM people ORDER BY id').fetchall()
    finally:
        db.close()
    assert [row[0] for row in rows] == list(range(1, 12346))
    for row in rows[::500]:
        assert validate(dict(zip(FIELDS, row[1:])))  # every generated person obeys the field rules
