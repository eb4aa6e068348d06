# Everything a fresh Debian/Ubuntu machine needs, installed by the project itself.
#   make serve   set up, then run the broker on the embedded local cloud
#   make test    set up, then lint, type-check and run the whole test suite
# Both need root (network namespaces); see README.md.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PG_MAJOR ?= 15
PG_BIN  := /usr/lib/postgresql/$(PG_MAJOR)/bin
PYTEST_ARGS ?=

export BROKER_STATE_DIR ?= /var/lib/pgha-broker

.PHONY: setup system-packages test-packages python-env serve test lint typecheck unit benchmark clean-local

setup: system-packages python-env

# apt packages: PostgreSQL server binaries (without the distribution's default
# cluster), pgBackRest (continuous archiving and backups), iproute2 for namespaces
# and veths, venv support for python3.
system-packages:
	@if [ "$$(id -u)" != 0 ]; then echo "make: run as root (the local cloud creates network namespaces)"; exit 1; fi
	@missing=""; \
	  [ -x $(PG_BIN)/initdb ] || missing="$$missing postgresql-$(PG_MAJOR) postgresql-contrib-$(PG_MAJOR)"; \
	  command -v pgbackrest >/dev/null || missing="$$missing pgbackrest"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  $(PYTHON) -m venv --help >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    mkdir -p /etc/postgresql-common; \
	    grep -qs '^create_main_cluster' /etc/postgresql-common/createcluster.conf || \
	      echo 'create_main_cluster = false' >> /etc/postgresql-common/createcluster.conf; \
	    apt-get update -qq || true; \
	    for try in 1 2 3 4 5 6 7 8 9 10 11 12; do \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=60 $$missing && break; \
	      [ $$try = 12 ] && exit 1; echo "apt-get busy (dpkg lock?), retrying"; sleep 10; \
	    done; \
	  fi
	@# `postgres` runs the tests' own PostgreSQL servers (the local cloud makes a user per volume)
	@id postgres >/dev/null 2>&1 || useradd --system --home /var/lib/postgresql --shell /bin/false postgres

python-env: $(VENV)/.installed

# requirements.txt as constraints: the tests run on the versions Cloud Foundry deploys.
$(VENV)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -c requirements.txt -e '.[test]'
	touch $@

serve: setup
	$(PY) -m broker serve

lint: python-env
	$(VENV)/bin/ruff check broker migrations tests benchmarks harness

typecheck: python-env
	$(VENV)/bin/mypy

# Only the tests need these: chromium (the status page in a real browser) and
# prometheus for its promtool (checks the example alert rules). The package's own
# Prometheus server is not started: a test machine serves nothing on :9090.
test-packages:
	@missing=""; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing for the tests:$$missing"; \
	    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 755 /usr/sbin/policy-rc.d; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	    status=$$?; rm -f /usr/sbin/policy-rc.d; exit $$status; \
	  fi

test: setup test-packages lint typecheck
	$(VENV)/bin/pytest -n 2 -p no:cacheprovider $(PYTEST_ARGS)

# Every script rewrites its own section of BENCHMARKS.md (between its markers) and
# keeps its raw data in benchmarks/results/.
# TLS_BASE: the last commit before TLS, which tls_cost.py measures against.
TLS_BASE ?= f04a4e7
benchmark: setup
	@command -v wrk >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
	$(PY) benchmarks/provision.py --runs 5 --write BENCHMARKS.md --json benchmarks/results/provision.json
	$(PY) benchmarks/api_throughput.py --write BENCHMARKS.md --json benchmarks/results/api_throughput.json
	$(PY) benchmarks/failover.py --rounds 10 --write BENCHMARKS.md --json benchmarks/results/failover.json
	$(PY) benchmarks/tls_cost.py --base $(TLS_BASE) --write BENCHMARKS.md
	$(PY) benchmarks/mass_failover.py --instances 20 --json --write BENCHMARKS.md
	$(PY) benchmarks/metrics_scrape.py --instances 1000 --failovers 500 --scrapes 30 --write BENCHMARKS.md --json benchmarks/results/metrics_scrape.json
	$(PY) benchmarks/openstack_failover.py --runs 3 --write BENCHMARKS.md --json benchmarks/results/openstack_failover.json
	$(PY) benchmarks/monitor_scale.py --instances 1000 --seconds 60 --crashed 20 --frozen 20 --write BENCHMARKS.md --json benchmarks/results/monitor_scale.json
	$(PY) benchmarks/backup.py --size-mb 1024 --seconds 60 --write BENCHMARKS.md --json benchmarks/results/backup.json

# Remove every namespace, interface and data directory of the dev broker's local cloud.
clean-local: python-env
	$(PY) -c "from broker.config import load_settings; from broker.cloud.local import LocalCloud; LocalCloud.from_settings(load_settings(require_auth=False)).destroy_everything()"
