#!/usr/bin/env python3
"""Start a distributed rtdist job: one machine, a hostfile, a SLURM allocation or MPI.

    python launch/launch.py [DeepSpeed runner flags] -- python -m rtdist.train --config configs/tiny.yaml ...

See rtdist/launch.py (the logic) and launch/README.md.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # works from a checkout without installing; the processes it starts get it too
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

from rtdist.launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
