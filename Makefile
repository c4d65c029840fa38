# The README's commands: `make quickstart` (the main job), `make test` (default tier, ~10 min),
# `make test-system` (system tier: process drills, TLS deployments, fleet load, engine agreement).
VENV ?= .venv
STAMP := $(VENV)/.bootstrapped
OUT ?= runs/quickstart
ARGS ?=

.PHONY: quickstart test test-system test-slow bench clean

$(STAMP): pyproject.toml tools/bootstrap.sh
	bash tools/bootstrap.sh $(VENV)
	@touch $@

quickstart: $(STAMP)
	$(VENV)/bin/edgefl-sim --config configs/quickstart.yaml --out $(OUT) $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not system" -q

test-system: $(STAMP)
	$(VENV)/bin/python -m pytest -m "system and not slow" -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow -q

clean:
	rm -rf runs .pytest_cache
