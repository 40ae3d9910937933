"""kiln.passes: the compiler's pass pipeline, from a traced step graph to one lowered graph per
phase (see pipeline.py for the list of steps, fuse.py for the fused form codegen consumes), and
the sharding pass that rewrites a traced graph for tensor parallelism before it (shard.py)."""

from kiln.passes.context import PHASES, PassContext
from kiln.passes.cost import launches, launches_per_layer
from kiln.passes.derive import ConcatWeights, ScaleColumns, materialize_weights
from kiln.passes.pipeline import PipelineOptions, PipelineReport, run_pipeline
from kiln.passes.plan_memory import peak_activation_bytes
from kiln.passes.shard import fitting_degrees, shard
from kiln.passes.shard_specs import shard_weights

__all__ = [
    "PHASES", "PassContext", "launches", "launches_per_layer", "ConcatWeights", "ScaleColumns", "materialize_weights",
    "PipelineOptions", "PipelineReport", "run_pipeline", "peak_activation_bytes", "fitting_degrees", "shard",
    "shard_weights",
]
