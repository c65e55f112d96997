"""The fp32 export of a finished run (``RUN_DIR/model.safetensors`` next to its ``config.yaml``): written at the end
of training, read by evaluation and generation."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import load_config
from .errors import CheckpointError
from .fileio import atomic_path
from .model import RoutingTransformerLM


def export_safetensors(state: dict, path: Path, metadata: Optional[dict] = None) -> None:
    """One fp32 safetensors file for inference (rank 0)."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_model_for_inference(checkpoint: Path, device: str = "cpu"):
    """(model, config) from a run directory's safetensors export and resolved config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"--checkpoint {checkpoint} does not exist: pass a run directory (what --run-dir named "
                              f"in training) or its model.safetensors")
    run_dir = checkpoint if checkpoint.is_dir() else checkpoint.parent
    weights = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    cfg_path = run_dir / "config.yaml"
    if not weights.is_file():
        hint = ("; it has checkpoints but no export: its training did not finish (resume it with --resume auto)"
                if (run_dir / "checkpoints").is_dir() else "")
        raise CheckpointError(f"{weights} does not exist: pass a run directory whose training finished (it exports "
                              f"model.safetensors) or the path of a .safetensors file next to a config.yaml{hint}")
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} does not exist: the run directory's resolved config is needed next to "
                              f"{weights.name}")
    cfg = load_config(str(cfg_path))
    model = RoutingTransformerLM(cfg.model)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file ({e}): export it again by resuming the "
                              f"run (--resume auto)") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    real_missing = [k for k in missing if not k.endswith(("step_sums", "step_counts", "inv_freq"))]
    if real_missing or unexpected:
        raise CheckpointError(f"{weights} does not match the model of {cfg_path}: missing {real_missing}, "
                              f"unexpected {unexpected}")
    return model.to(device).eval(), cfg
