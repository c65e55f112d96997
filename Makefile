# Two commands on a fresh machine: `make demo` (the main job, end to end, CPU) and `make test` (the test suite).
# Each creates its own virtualenv and installs torch before the project, so pip never pulls a CUDA build here.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rtdist-installed
DEMO_DIR ?= runs/demo
# Everything runs with the virtualenv's bin/ first on PATH, as an activated venv has it: DeepSpeed JIT-builds its CPU
# op with whichever `ninja` comes first, and two ninja versions (the venv's and the system's) disagree about the
# build log, so each alternation rebuilt the op (~45 s on 2 cores) in the middle of a run.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH"

.PHONY: install test test-all demo clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev,mpi]'
	@# DeepSpeed compiles a small CPU communication op on first use (~30-75 s on 2 cores): here, once, rather than
	@# inside the first demo or test run. Without a compiler DeepSpeed runs without it.
	$(RUN) DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" \
		|| echo "note: DeepSpeed's CPU communication op did not build; training runs without it"
	touch $(STAMP)

install: $(STAMP)

# As root with apt (CI here), the SLURM test cluster's packages and nginx (the streaming tests' HTTP server) are
# installed first; elsewhere those tests skip and say why. The scripts never fail the run.
test: $(STAMP)
	@bash .ci/setup_slurm.sh
	@bash .ci/setup_servers.sh
	$(RUN) $(PY) -m pytest -q -m "not slow" tests

# Everything, the slow second paths too (real mpirun, the same-shape sbatch resubmission, gpu_check's dry pass, the
# SP benchmark tool, aliases of a tested checkpoint policy).
test-all: $(STAMP)
	@bash .ci/setup_slurm.sh
	@bash .ci/setup_servers.sh
	$(RUN) $(PY) -m pytest -q tests

# `make demo DATA_URL=s3://bucket/demo-manifest.json` trains from shards at a URL (8192-token samples, as the
# demo writes them; AWS_* give the endpoint and credentials); DATA_CACHE_DIR=DIR reads them through a node cache.
demo: $(STAMP)
	$(RUN) $(PY) tools/demo.py --out $(DEMO_DIR) $(if $(DATA_URL),--data-url $(DATA_URL)) \
		$(if $(DATA_CACHE_DIR),--data-cache-dir $(DATA_CACHE_DIR))

clean:
	rm -rf $(VENV) runs
