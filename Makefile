# The two commands: `make up` (set up and start everything) and `make test` (set up and run the tests).
.PHONY: up down test restart logs ps clean prefetch chaos
VAR_DIR ?= var

up:
	@bash scripts/bootstrap.sh
	@.venv/bin/python scripts/stack.py up

down:
	@if [ -x .venv/bin/python ]; then .venv/bin/python scripts/stack.py down; fi

restart: down up

test:
	@bash scripts/bootstrap.sh
	@.venv/bin/python -m pytest $(PYTEST_ARGS)

# Starts its own stack (var/chaos, free ports), submits jobs while killing workers and Redis, prints a ledger.
chaos:
	@bash scripts/bootstrap.sh
	@.venv/bin/python scripts/chaos.py $(CHAOS_ARGS)

prefetch:
	@bash scripts/bootstrap.sh
	@.venv/bin/python scripts/prefetch.py

ps:
	@.venv/bin/supervisorctl -c $(VAR_DIR)/supervisord.conf status

logs:
	@tail -n 50 -f $(VAR_DIR)/log/*.log

clean: down
	rm -rf $(VAR_DIR)
