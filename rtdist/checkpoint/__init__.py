"""Checkpoints in the DeepSpeed layout (``dir/global_step{N}/`` + ``dir/latest``) that cannot be lost or silently wrong.

* A checkpoint is written under a staging name (``global_step{N}.tmp-<nonce>``) and renamed to ``global_step{N}``
  only after every rank's files are written and its ``complete`` marker (:class:`Marker`), which lists every file
  with its size and sha256, is in place; ``latest`` is replaced atomically after that. A crash at any moment leaves
  the previous checkpoint loadable and the staging folder unmistakably unfinished (it is removed by the next save).
* A complete checkpoint is never rewritten: saving a step that already holds this state is a no-op (a finished run
  that is resubmitted resumes at its last step, trains nothing and saves nothing). It is deleted only by retention
  (``train.keep_last``), never the one ``latest`` names.
* Loading verifies the files against the marker, each rank the files it wrote (agreement all-reduced).
  ``--resume auto`` skips a corrupt checkpoint for the previous complete one, with a line saying so.

Per-rank state (data-loader position, the loop's counters, RNG streams) goes next to the engine's files as
``rtdist_rank{r}.pt``. The modules: ``store`` (the files), ``marker``, ``state`` (:class:`TrainState`, random
streams), ``manager`` (:class:`CheckpointManager`: the resume and save policy of a run), ``info`` (the CLI).
"""
from ..errors import CheckpointError
from ..fileio import atomic_torch_save, atomic_write_text, sha256_file
from .info import describe, main, resume_shapes
from .manager import CheckpointManager, check_model_shape, kept_accumulation
from .marker import MARKER, Marker, marker_problem, read_marker
from .state import TrainState, restore_rng, rng_state
from .store import (_clean_staging, candidates, checksum_files, complete_steps, fault_point, is_complete,
                    load_rank_state, prune, resolve_resume, save, verify)

__all__ = ["MARKER", "CheckpointError", "CheckpointManager", "Marker", "TrainState", "atomic_torch_save",
           "atomic_write_text", "candidates", "check_model_shape", "checksum_files", "complete_steps", "describe",
           "fault_point", "is_complete", "kept_accumulation", "load_rank_state", "main", "marker_problem", "prune",
           "read_marker", "resolve_resume", "restore_rng", "resume_shapes", "rng_state", "save", "sha256_file",
           "verify"]
