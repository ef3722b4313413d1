# Set-up and batch entry points. `make demo` and `make test` are all a fresh machine needs.
#
# The venv holds an editable install (`pip install -e '.[test]'`): setuptools maps the
# repository root onto the `distill` package (package-dir in pyproject.toml) through an
# import hook, so edits under storage/, pipeline/, stages/ are live without reinstalling.
# Torch: see scripts/setup-venv.sh (TORCH_SPEC, TORCH_INDEX_URL, TORCH_CPU_VERSION).

PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=

export PYTHON VENV

.PHONY: venv test demo bench-store bench-quality labels student teacher clean

venv:
	@scripts/setup-venv.sh

test: venv
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(VENV)/bin/distill demo --out demo-out

bench-store: venv
	$(VENV)/bin/python benchmarks/store.py

# The quality tables of docs/RESULTS.md and docs/results/*.json (2 CPU cores: mnist1d ~12 min; lm 35 min (measured) once its
# teacher is trained, which takes ~16 min more the first time; runs cached in .bench-quality/)
bench-quality: venv
	$(VENV)/bin/python benchmarks/quality.py --workload all

# Stage one as a batch job: make labels TEACHER=... DATA=... OUT=... [ARGS="--k 32 --shard 0/4 ..."]
# (or CONFIG=job.toml holding the same settings). Rerunning the same command resumes.
# Relative paths inside CONFIG are taken from CONFIG's own directory; CONFIG, DATA, OUT, ... themselves from
# the directory make runs in, which `make -C REPO` makes the repository: give them absolute paths there.
labels: venv
	$(VENV)/bin/distill generate-labels $(if $(TEACHER),--teacher '$(TEACHER)') $(if $(DATA),--data '$(DATA)') \
		$(if $(OUT),--out '$(OUT)') $(if $(CONFIG),--config '$(CONFIG)') $(ARGS)

# Stage two: make student LABELS=... STUDENT=... DATA=... OUT=... [ARGS="--epochs 3 ..."]
student: venv
	$(VENV)/bin/distill train-student $(if $(LABELS),--labels '$(LABELS)') $(if $(STUDENT),--student '$(STUDENT)') \
		$(if $(DATA),--data '$(DATA)') $(if $(OUT),--out '$(OUT)') $(if $(CONFIG),--config '$(CONFIG)') $(ARGS)

# A teacher (or the from-scratch baseline) on hard labels: make teacher MODEL=... DATA=... OUT=...
teacher: venv
	$(VENV)/bin/distill train-teacher $(if $(MODEL),--model '$(MODEL)') $(if $(DATA),--data '$(DATA)') \
		$(if $(OUT),--out '$(OUT)') $(if $(CONFIG),--config '$(CONFIG)') $(ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache demo-out .bench-quality
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
