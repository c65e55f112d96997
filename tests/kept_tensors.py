"""What a forward leaves alive for backward, measured from the outside: every storage that the forward's ops
created (seen by a dispatch mode, so no saved-tensor hooks of our own change what the model does) and that is
still referenced once it returned."""
import gc

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


def kept_bytes(fn):
    """fn()'s result and the bytes of every tensor that fn's ops created and that is still alive once fn returned:
    what the forward keeps for backward (seen from the outside: no saved-tensor hooks of our own)."""
    created = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor)}
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:  # not a view
                    st = t.untyped_storage()
                    created.setdefault(st._cdata, (StorageWeakRef(st), st.nbytes()))
            return out
    with Track():
        out = fn()
    gc.collect()
    return out, sum(nbytes for ref, nbytes in created.values() if not ref.expired())
