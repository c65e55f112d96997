# Two commands on a fresh machine: `make demo` (the main job, end to end, CPU) and `make test` (the test suite).
# Each creates its own virtualenv and installs torch before the project, so pip never pulls a CUDA build here.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rtdist-installed
DEMO_DIR ?= runs/demo

.PHONY: install test test-all demo clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev,mpi]'
	@# DeepSpeed compiles a small CPU communication op on first use (~30-75 s on 2 cores): here, once, rather than
	@# inside the first demo or test run. Without a compiler DeepSpeed runs without it.
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		|| echo "note: DeepSpeed's CPU communication op did not build; training runs without it"
	touch $(STAMP)

install: $(STAMP)

# As root with apt (CI here), the SLURM test cluster's packages are installed first; elsewhere those tests skip
# and say why. The script never fails the run.
test: $(STAMP)
	@bash .ci/setup_slurm.sh
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/demo.py --out $(DEMO_DIR)

clean:
	rm -rf $(VENV) runs
