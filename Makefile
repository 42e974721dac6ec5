# Set-up and the two entry points of the README. Everything installs into .venv.
# Bring your own torch (>= 2.4) with e.g. `make run TORCH="torch==2.5.1"`; this repo's CI pins the CPU wheel.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PRESET ?= digits-mulan-ends-map
OUT    ?= runs/$(PRESET)-$(shell date +%Y%m%d-%H%M%S)
BIN     = $(VENV)/bin

.PHONY: run test install clean fashion-data

install: $(VENV)/.installed

# torch is installed first and on its own, so nothing else can make pip pick another torch build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

# The main job: train the best MuLAN configuration on the bundled digits (benchmarks/mulan_vs_vdm.py), evaluate the
# whole test split, sample, plot. `make run PRESET=digits-mulan` trains the paper's MuLAN instead.
run: install
	$(BIN)/mulan train --preset $(PRESET) --out $(OUT)

# The test suite (two worker processes).
test: install
	$(BIN)/python -m pytest -n 2 -q tests

# Fashion-MNIST (28x28, V = 256) for the fashion-* presets: Debian's package puts the IDX files in
# /usr/share/datasets/fashion-mnist, where data.name=fashion-mnist looks (run as root, or with sudo).
fashion-data:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y dataset-fashion-mnist

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
