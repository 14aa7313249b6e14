# The two commands: `make run` serves on 127.0.0.1:8000 with SQLite; `make test` runs the suite.
# Both set up everything first: system packages through apt-get when missing, then .venv.
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 1
DATABASE_URL ?= sqlite:///people.db
ACCESS_LOG ?= on
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test bench stack soak system-packages reset-db clean

# make run is for local use: tokens off (so the original curl commands work), loopback only.
# deploy/foreground.py lets Ctrl-C stop the service without make reporting an interrupt; kill -USR2 on
# the master (the pid in its "serving" log line) reloads the code (docs/deploy.md, "Ship new code").
# DATABASE_URL goes in the environment, not in the recipe: it may hold a password (the service logs it
# masked), and a shell would split a URL with '&' in its query.
#
# QUIETLY_FAILED ends run and stack when what they start cannot (a taken port, a database it cannot open):
# it has said why in one line, so make is stopped with SIGINT, which it obeys without a line of its own
# (exit 130), where a failed recipe would add "*** [run] Error 1"; the shell outlives that SIGINT, which
# make would otherwise find with its child already reaped. A make that ignores SIGINT (bit 2 of SigIgn:
# a script's background job) fails with the recipe's status instead, its error line and all.
QUIETLY_FAILED = { s=$$?; if [ $$(( 0x$$(sed -n 's/^SigIgn:\s*//p' /proc/$$PPID/status) & 2 )) = 0 ]; \
	then kill -INT $$PPID; sleep 1; else exit $$s; fi; }

run: export DATABASE_URL := $(DATABASE_URL)
run: $(VENV)/.installed
	@HOST=$(HOST) PORT=$(PORT) WORKERS=$(WORKERS) ACCESS_LOG=$(ACCESS_LOG) PEOPLE_AUTH=off \
		$(PY) deploy/foreground.py $(PY) service.py serve || $(QUIETLY_FAILED)

test: $(VENV)/.installed
	$(PY) -m pytest

# Debian packages, each only when what it provides is missing: bjoern builds with gcc against
# libev and the Python headers; the venv needs ensurepip; the tests call curl.
system-packages:
	@need=""; \
	[ -f /usr/include/ev.h ] || need="$$need libev-dev"; \
	python3 -c 'import ensurepip, venv' 2>/dev/null || need="$$need python3-venv"; \
	[ -f "$$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ] || need="$$need python3-dev"; \
	command -v gcc >/dev/null || need="$$need gcc"; \
	command -v curl >/dev/null || need="$$need curl"; \
	if [ -n "$$need" ]; then \
		echo "installing system packages:$$need"; \
		$(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q $$need; \
	fi

$(VENV)/.installed: requirements.txt
	@$(MAKE) --no-print-directory system-packages
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# An empty database for make run: the SQLite file and what SQLite and the service keep beside it.
reset-db:
	rm -f people.db people.db-wal people.db-shm people.db.write-lock

clean: reset-db
	rm -rf $(VENV)

# Benchmarks (never part of `make test`): see docs/performance.md. BENCH_ARGS passes options; the
# recipe is not echoed, since they may hold a --database-url with a password.
bench: $(VENV)/.installed
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -q wrk
	@$(PY) bench/run.py $(BENCH_ARGS)

# The production topology, unprivileged, in the foreground: nginx with TLS in front of the workers.
stack: $(VENV)/.installed
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || $(SUDO) apt-get install -y -q nginx
	@[ -f /usr/lib/nginx/modules/ngx_http_headers_more_filter_module.so ] || $(SUDO) apt-get install -y -q libnginx-mod-http-headers-more-filter
	@command -v openssl >/dev/null || $(SUDO) apt-get install -y -q openssl
	@[ "$(POOLER)" != 1 ] || [ -x /usr/sbin/pgbouncer ] || $(SUDO) apt-get install -y -q pgbouncer
	@$(PY) deploy/foreground.py $(PY) deploy/stack.py || $(QUIETLY_FAILED)

# A few minutes of the 90/10 read/create mix across two workers: errors and memory (docs/reliability.md).
# SOAK_SECONDS and SOAK_PORT (18600) override.
soak: $(VENV)/.installed
	@command -v wrk >/dev/null || $(SUDO) apt-get install -y -q wrk
	$(PY) bench/run.py --only mix_90_10 --workers 2 --seconds $(or $(SOAK_SECONDS),180) --port $(or $(SOAK_PORT),18600)
