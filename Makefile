# The two commands: `make up` (set up and start everything) and `make test` (set up and run the tests).
.PHONY: up down test restart logs ps clean prefetch chaos status load bench
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

# The model alone, ours and naive Celery side by side (bench/bench.py): bench/results/latest.json and PNG
# plots. BENCH_ARGS=--quick for a few minutes; --models NAME,... for other models.
bench:
	@bash scripts/bootstrap.sh
	@.venv/bin/python bench/bench.py $(BENCH_ARGS)

prefetch:
	@bash scripts/bootstrap.sh
	@.venv/bin/python scripts/prefetch.py

# Locust against a running stack (`make up`): quiet, burst, quiet (locustfile.py lists the LOAD_* knobs);
# CSV and HTML reports in $(VAR_DIR)/load/. LOAD_RUN_TIME caps the run.
LOAD_HOST ?= http://127.0.0.1:8000
LOAD_RUN_TIME ?= 10m
load:
	@bash scripts/bootstrap.sh
	@mkdir -p $(VAR_DIR)/load
	@.venv/bin/locust -f locustfile.py --headless --host $(LOAD_HOST) --run-time $(LOAD_RUN_TIME) \
		--csv $(VAR_DIR)/load/stats --html $(VAR_DIR)/load/report.html $(LOAD_ARGS)

# Workers, queues by priority, jobs/s and recent failures, read from Redis (STATUS_ARGS=--watch, --json).
status:
	@.venv/bin/python scripts/status.py $(STATUS_ARGS)

ps:
	@.venv/bin/supervisorctl -c $(VAR_DIR)/supervisord.conf status

logs:
	@tail -n 50 -f $(VAR_DIR)/log/*.log

clean: down
	rm -rf $(VAR_DIR)
