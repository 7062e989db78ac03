PY := .venv/bin/python
.PHONY: run test lint typecheck bench setup browser
setup: .venv/.installed
.venv/.installed: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	touch $@
run: setup
	.venv/bin/kibble demo
# pyproject.toml [tool.ruff] says which rules and why.
lint: setup
	.venv/bin/ruff check .
# The whole suite on mosquitto, then the @pytest.mark.amqtt subset again with every directory
# holding a mosquitto executable dropped from PATH, so the broker fixture falls back to amqtt.
# The dashboard's browser tests drive Debian's chromium (never `playwright install`: it downloads
# a browser); installed here when it is missing and we are root, else those tests say why they skip.
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; fi
# pyproject.toml [tool.mypy] says which checks and why. mypy needs the `kibble.*` names, which
# setuptools maps onto the top-level folders: a tree of links gives it them without an install.
typecheck: setup
	mkdir -p .mypy_tree/kibble
	ln -sfn $(CURDIR)/bus_schema $(CURDIR)/control $(CURDIR)/hil_sim $(CURDIR)/services .mypy_tree/kibble/
	cd .mypy_tree && ../.venv/bin/mypy --config-file ../pyproject.toml
test: lint typecheck browser
	$(PY) -m pytest
	PATH="$$(printf '%s\n' "$$PATH" | tr ':' '\n' | while read -r d; do [ -x "$$d/mosquitto" ] || printf '%s\n' "$$d"; done | paste -sd: -)" \
		$(PY) -m pytest -m amqtt
bench: setup
	.venv/bin/kibble bench --json bench.json
