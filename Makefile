# The verbs people use. Everything runs from the workspace's .venv
# (created by deploy/install.sh, which `up` and `test` run first).
PY := .venv/bin/python
BUF := node_modules/.bin/buf
ARGS ?=

.PHONY: install up up-detached down status wipe test bench proto lint breaking rebuild-360 lock

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

bench: install
	$(PY) -m bench $(ARGS)

proto: install
	proto/generate.sh

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy common/src/crm_common services/*/src deploy/src
	$(BUF) lint proto

# buf breaking against main (AGAINST=<git ref> to compare with another branch or tag).
AGAINST ?= main
breaking: install
	$(BUF) breaking proto --against '.git#branch=$(AGAINST),subdir=proto'

lock:
	uv lock
	uv export --no-hashes --no-emit-workspace --all-groups --no-header --no-annotate --frozen -o constraints.txt
