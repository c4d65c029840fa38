# The two commands of the README: `make quickstart` (the main job) and `make test`.
VENV ?= .venv
STAMP := $(VENV)/.bootstrapped
OUT ?= runs/quickstart

.PHONY: quickstart test test-slow bench clean

$(STAMP): pyproject.toml tools/bootstrap.sh
	bash tools/bootstrap.sh $(VENV)
	@touch $@

quickstart: $(STAMP)
	$(VENV)/bin/edgefl-sim --config configs/quickstart.yaml --out $(OUT)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow -q

clean:
	rm -rf runs .pytest_cache
