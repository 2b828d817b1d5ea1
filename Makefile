# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev,spark]'
	touch $(STAMP)

DEMO := demo_output

demo: $(STAMP)
	$(PY) -m pipeline.demo --out $(DEMO)
	@echo "[4/5] training the student with torchrun on 2 CPU processes (gloo), W&B offline; a rerun resumes"
	$(VENV)/bin/torchrun --nproc_per_node 2 -m train.main --recipe demo --model train/model_configs/demo-clip.json \
		--teacher_weights "" --labeled $(DEMO)/shards/labeled --unlabeled $(DEMO)/shards/webvid \
		--val $(DEMO)/shards/webvid --out $(DEMO)/run --resume auto --progress False
	@echo "[5/5] fused model: $(DEMO)/run/fitclip.pt (open_clip state dict); run summary:"
	@cat $(DEMO)/run/summary.json

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(STAMP)
	$(PY) -m benchmarks.shard_bench

clean-demo:
	rm -rf demo_output
