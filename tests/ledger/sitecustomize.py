"""An observer for tests/test_resume_reshape.py, on PYTHONPATH only there: with RTDIST_LEDGER set, every process's
training loader (``shuffle=True``) appends one line per batch it hands to the trainer to ``$RTDIST_LEDGER.<RANK>``:
``<dp_rank> <sample key> ...``. The loader itself runs unchanged; this only records what it yields."""
import os

if os.environ.get("RTDIST_LEDGER"):
    from rtdist.data import loader as _loader

    _iter = _loader.ShardLoader.__iter__

    def _recording_iter(self):
        if not self.shuffle:  # evaluation data
            yield from _iter(self)
            return
        with_keys, self.with_keys = self.with_keys, True
        path = f"{os.environ['RTDIST_LEDGER']}.{os.environ.get('RANK', '0')}"
        try:
            for tokens, keys in _iter(self):
                with open(path, "a") as f:
                    f.write(f"{self.dp_rank} {' '.join(keys)}\n")
                yield (tokens, keys) if with_keys else tokens
        finally:
            self.with_keys = with_keys

    _loader.ShardLoader.__iter__ = _recording_iter
