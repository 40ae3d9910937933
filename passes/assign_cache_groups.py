"""Cache-group assignment: each attention layer reads its cache group's block table and slot
mapping (ir/cache_groups.py). Group 0 keeps the step inputs `block_tables` / `slot_mapping`; the
layers of group g > 0 get the step inputs `block_tables_g<g>` / `slot_mapping_g<g>` instead (same
types). Run on the traced graph, before the pipeline; with one group it changes nothing.
"""

from __future__ import annotations

from kiln.contract import CacheGroup, group_input_names
from kiln.ir import Graph, GraphBuilder, Node

TABLE, SLOTS = 7, 8  # the attention op's block_tables and slot_mapping inputs


def assign_cache_groups(graph: Graph, groups: list[CacheGroup]) -> Graph:
    group_of_layer = {layer: g for g, group in enumerate(groups) for layer in group.layers}
    if not any(group_of_layer.values()):
        return graph

    def rewrite(builder: GraphBuilder, node: Node, inputs: tuple[Node, ...]) -> Node | None:
        if node.op != "attention" or not group_of_layer[node.attrs["layer"]]:
            return None
        table_name, slots_name = group_input_names(group_of_layer[node.attrs["layer"]])
        rewired = list(inputs)
        rewired[TABLE] = builder.input(table_name, inputs[TABLE].type)
        rewired[SLOTS] = builder.input(slots_name, inputs[SLOTS].type)
        return builder.op(node.op, *rewired, **node.attrs)

    return graph.rebuild(rewrite)
