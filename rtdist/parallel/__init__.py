"""Everything that knows about processes: engines (DeepSpeed, fairscale, torch) and, later, sequence parallelism."""
from .engines import DeepSpeedEngine, Engine, FairscaleEngine, OptimConfig, TorchEngine, build_engine

__all__ = ["DeepSpeedEngine", "Engine", "FairscaleEngine", "OptimConfig", "TorchEngine", "build_engine"]
