"""Everything that knows about processes: the parallel layout (``ParallelDims``), sequence parallelism, activation
checkpointing, the engines, and ``parallelize``, which applies them to a model in one fixed order."""
from .dims import ParallelDims
from .engines import DeepSpeedEngine, Engine, FairscaleEngine, TorchEngine, build_engine, check_engine
from .optim import OptimConfig
from .parallelize import optim_config, parallelize, parallelize_model

__all__ = ["DeepSpeedEngine", "Engine", "FairscaleEngine", "OptimConfig", "ParallelDims", "TorchEngine",
           "build_engine", "check_engine", "optim_config", "parallelize", "parallelize_model"]
