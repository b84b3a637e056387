"""zero-adam: a ZeRO-1/2 sharded AdamW for PyTorch data-parallel training.

``ZeroAdamW`` flattens parameters into buckets, gives each data-parallel rank an equal contiguous
slice, reduce-scatters gradients in, runs torch's fused AdamW on the local FP32 shard and
all-gathers the updated parameters out.
"""

from . import checkpoint
from .optimizer import ZeroAdamW
from .options import ShardingOptions
from .plan import Plan, build_plan
from .state import compact_state_dict

__all__ = ["ZeroAdamW", "ShardingOptions", "Plan", "build_plan", "checkpoint", "compact_state_dict"]
__version__ = "0.1.0"
