"""kiln's IR: nodes with sympy-shaped types, a printer, a verifier and a reference interpreter."""

from kiln.ir.graph import Graph, GraphBuilder, Node, infer_type
from kiln.ir.interpret import InterpretError, interpret, interpret_ranks
from kiln.ir.ops import OPS, FusionPattern, OpDef, OpKind
from kiln.ir.printer import op_counts, print_graph
from kiln.ir.specs import (
    AttentionKind,
    AttentionSpec,
    BlockSparseLayout,
    KVLayout,
    LinearAttentionSpec,
    RopeScaling,
    RopeSpec,
)
from kiln.ir.types import DTYPES, NB, NS, STEP_SYMBOLS, B, M, T, TensorType, TupleType, dtype_name
from kiln.ir.verify import VerifyError, verify

__all__ = [
    "Graph", "GraphBuilder", "Node", "infer_type", "interpret", "interpret_ranks", "InterpretError", "OPS", "OpDef",
    "OpKind", "FusionPattern",
    "print_graph", "op_counts", "AttentionKind", "AttentionSpec", "BlockSparseLayout", "KVLayout",
    "LinearAttentionSpec", "RopeScaling", "RopeSpec", "B", "DTYPES", "M", "NB", "NS", "STEP_SYMBOLS", "T",
    "TensorType", "TupleType", "dtype_name", "VerifyError", "verify",
]
