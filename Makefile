# The verbs people use. Everything runs from the workspace's .venv
# (created by deploy/install.sh, which `up` and `test` run first).
PY := .venv/bin/python
BUF := node_modules/.bin/buf
ARGS ?=

.PHONY: install up up-detached down status wipe test unit fmt bench proto registry lint breaking rebuild-360 lock asyncapi

install:
	deploy/install.sh --with-node-tools

up:
	deploy/crm up $(ARGS)

up-detached:
	deploy/crm up --detach $(ARGS)

down:
	deploy/crm down

status:
	deploy/crm status

wipe:
	deploy/crm wipe

rebuild-360:
	deploy/crm rebuild-360

test:
	deploy/crm test $(ARGS)

# The tests that need no server (no Kafka, document store, PostgreSQL or service
# process): seconds, for the edit-test loop. `make test` runs everything.
unit: install
	$(PY) -m pytest -q -m "not servers" $(ARGS)

fmt: install
	.venv/bin/ruff check --fix .
	.venv/bin/ruff format .

bench: install
	$(PY) -m bench $(ARGS)

proto: install
	proto/generate.sh

# After changing crm_common.registry: the Helm chart's copy of it.
registry: install
	.venv/bin/crm-stack registry --write

# After changing proto/, the registry or access.yaml: the event contract, docs/asyncapi.yaml.
asyncapi: install
	.venv/bin/crm-stack asyncapi --write

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy common/src/crm_common services/*/src deploy/src frontends/src
	$(BUF) lint proto

# buf breaking against main (AGAINST=<git ref> to compare with another branch or tag).
AGAINST ?= main
breaking: install
	$(BUF) breaking proto --against '.git#branch=$(AGAINST),subdir=proto'

lock:
	uv lock
	uv export --no-hashes --no-emit-workspace --all-groups --no-header --no-annotate --frozen -o constraints.txt
