PY := .venv/bin/python
.PHONY: run test bench setup
setup: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@
run: setup
	KIBBLE_STATE_DIR=.state timeout 20 .venv/bin/kibble broker --port 0 || test $$? -eq 124
test: setup
	$(PY) -m pytest
bench: setup
	.venv/bin/kibble bench --json bench.json
