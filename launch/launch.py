#!/usr/bin/env python3
"""Start a distributed rtdist job: one machine, a hostfile, a SLURM allocation or MPI (see launch/README.md).

    python launch/launch.py [DeepSpeed runner flags] -- python -m rtdist.train --config configs/tiny.yaml ...

The same as ``python -m rtdist.launcher`` and the ``rtdist-launch`` command. It imports the installed package
(``make install``, or ``pip install -e .``); from a checkout that is not installed, set PYTHONPATH to it.
"""
import sys
from rtdist.launcher import main
sys.exit(main())
