"""rtdist: distributed training of Routing Transformers on very long sequences."""
__version__ = "0.1.0"
