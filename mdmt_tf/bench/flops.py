"""Count the FLOPs of the matrix products in a traced TensorFlow graph.

Matrix products (MatMul, BatchMatMul, Einsum) dominate these models; elementwise ops,
gathers and reductions are not counted, so the figure is a lower bound of the work done.
A multiply-add counts as 2 FLOPs. Shapes must be static (trace with a fixed batch size).
"""
from __future__ import annotations

import math

import numpy as np


def _dims(shape) -> list[int] | None:
    dims = shape.as_list() if hasattr(shape, "as_list") else list(shape)
    return None if any(d is None for d in dims) else dims


def _matmul(op) -> int:
    a, b = _dims(op.inputs[0].shape), _dims(op.inputs[1].shape)
    if a is None or b is None:
        return 0
    ta = op.get_attr("transpose_a") if "transpose_a" in op.node_def.attr else False
    m, k = (a[-1], a[-2]) if ta else (a[-2], a[-1])
    n = b[-2] if (op.get_attr("transpose_b") if "transpose_b" in op.node_def.attr else False) else b[-1]
    return 2 * m * k * n


def _batch_matmul(op) -> int:
    a, b = _dims(op.inputs[0].shape), _dims(op.inputs[1].shape)
    if a is None or b is None:
        return 0
    adj_x = op.get_attr("adj_x") if "adj_x" in op.node_def.attr else False
    adj_y = op.get_attr("adj_y") if "adj_y" in op.node_def.attr else False
    m, k = (a[-1], a[-2]) if adj_x else (a[-2], a[-1])
    n = b[-2] if adj_y else b[-1]
    batch = int(np.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2])))) if (a[:-2] or b[:-2]) else 1
    return 2 * batch * m * k * n


def _einsum(op) -> int:
    equation = op.get_attr("equation").decode()
    inputs, _ = equation.replace(" ", "").split("->")
    terms = inputs.split(",")
    if len(terms) != 2 or "." in equation:
        return 0
    sizes: dict[str, int] = {}
    for term, tensor in zip(terms, op.inputs):
        dims = _dims(tensor.shape)
        if dims is None:
            return 0
        for letter, size in zip(term, dims):
            sizes[letter] = max(sizes.get(letter, 1), size)
    return 2 * math.prod(sizes.values())


COUNTERS = {"MatMul": _matmul, "_MklMatMul": _matmul, "BatchMatMul": _batch_matmul,
            "BatchMatMulV2": _batch_matmul, "BatchMatMulV3": _batch_matmul, "Einsum": _einsum}


def graph_matmul_flops(graph) -> int:
    """Sum over the graph's matrix products, recursing into called functions."""
    total = 0
    for op in graph.get_operations():
        counter = COUNTERS.get(op.type)
        if counter is not None:
            total += counter(op)
    for function in getattr(graph, "_functions", {}).values():
        inner = getattr(function, "graph", None)
        if inner is not None:
            total += graph_matmul_flops(inner)
    return total
