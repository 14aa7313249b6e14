"""The files under deploy/ are valid for the tools that read them."""
import os
import shutil
import subprocess

import pytest

from conftest import ROOT

DEPLOY = os.path.join(ROOT, 'deploy')


def require(tool, variable):
    if shutil.which(tool):
        return
    if os.environ.get(variable) == '1':
        pytest.fail(f'{variable}=1 but {tool} is not installed')
    pytest.skip(f'{tool} is not installed (Debian package {"prometheus" if tool == "promtool" else tool})')


def test_prometheus_alert_rules_pass_promtool():
    require('promtool', 'REQUIRE_PROMTOOL')
    result = subprocess.run(['promtool', 'check', 'rules', 'alerts.yml'], cwd=DEPLOY, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'SUCCESS: 4 rules found' in result.stdout


def test_prometheus_scrape_config_passes_promtool():
    require('promtool', 'REQUIRE_PROMTOOL')
    result = subprocess.run(['promtool', 'check', 'config', 'prometheus.yml'], cwd=DEPLOY,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
