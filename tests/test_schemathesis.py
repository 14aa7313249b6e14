"""schemathesis against /openapi.json of a running server (bjoern, real sockets, tokens on):
generated requests, valid and invalid, must never get a 5xx or a response the document does not
describe. Bounded (examples and seed fixed) so that CI is repeatable; raise -n to search harder.

One check is left out, for reasons the document cannot express: positive_data_acceptance expects
every schema-valid body to be accepted, but the form field `data` must hold JSON (any string is
schema-valid) and the field rules refuse 42.0 for an integer, which JSON Schema counts as one.
tests/schemathesis.toml keeps unexpected methods out (bjoern refuses them before the app)."""
import os
import subprocess
import sys

from conftest import ROOT, Server


def test_generated_requests_conform_to_the_document(database_url):
    token = subprocess.run([sys.executable, 'service.py', 'token', 'create', '--name', 'schemathesis', '--scope',
                            'write'], cwd=ROOT, env={**os.environ, 'DATABASE_URL': database_url}, check=True,
                           capture_output=True, text=True).stdout.splitlines()[-1]
    server = Server(database_url, workers=2, PEOPLE_AUTH='on')
    try:
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), 'schemathesis'),
             '--config-file', os.path.join(ROOT, 'tests', 'schemathesis.toml'), 'run', server.url + '/openapi.json',
             '--max-examples', '40', '--seed', '1', '--checks', 'all',
             '--exclude-checks', 'positive_data_acceptance',
             '--header', f'Authorization: Bearer {token}'],
            capture_output=True, text=True, timeout=600)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-6000:]
    assert 'No issues found' in result.stdout
    assert '"level":"error"' not in server.output()  # no unhandled exception behind a generated request
