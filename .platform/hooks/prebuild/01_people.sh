#!/bin/bash
# Elastic Beanstalk (Python on Amazon Linux 2023), before it installs requirements.txt and reads
# the Procfile, in the staging directory: what bjoern's build needs (it is a source distribution),
# the runtime pins only (requirements.txt holds the test pins too), and the web process EB runs
# (the top-level Procfile is Heroku's, whose web process starts an nginx of its own).
set -euo pipefail
python=$(ls /var/app/venv/*/bin/python 2>/dev/null | head -n1 || true)
version=$("${python:-python3}" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
dnf install -y -q gcc libev-devel "python${version}-devel"
cp deploy/requirements-runtime.txt requirements.txt  # with hashes: pip checks every file
printf 'web: python service.py serve --host 127.0.0.1\n' > Procfile
