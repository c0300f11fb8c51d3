# The two commands: `make up` (set up and start everything) and `make test` (set up and run the tests).
.PHONY: up down test restart logs ps clean prefetch
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

prefetch:
	@bash scripts/bootstrap.sh
	@.venv/bin/python scripts/prefetch.py

ps:
	@.venv/bin/supervisorctl -c $(VAR_DIR)/supervisord.conf status

logs:
	@tail -n 50 -f $(VAR_DIR)/log/*.log

clean: down
	rm -rf $(VAR_DIR)
