"""The primitive op set.

Each `Op` member carries its DSL name, its codegen kind and its arity; everything else about
an op lives in tables keyed by the op, beside the code that uses them (tinygrad/JAX style):

    lmc/ops/shapes.py     SHAPE_RULES[op]   input types + attrs -> output type
    lmc/ops/reference.py  REFERENCE[op]     the torch implementation (the oracle)

Later stages add their own tables (VJP rules, Triton emitters, decode rules) the same way.
Adding an op = one member here + one entry per table + one row in tests/ops/test_op_table.py;
tests/ops/test_registry.py fails when any table lacks an op.
"""
from __future__ import annotations

import enum


class Kind(enum.Enum):
    SOURCE = "source"          # no tensor inputs: inputs, params, constants, iota, masks
    POINTWISE = "pointwise"    # elementwise with broadcasting
    REDUCTION = "reduction"    # reduces (or scans across) one axis: sum, softmax, cumsum
    MATMUL = "matmul"          # contraction
    VIEW = "view"              # data movement only: reshape, permute, expand, slice, concat
    INDEX = "index"            # data-dependent addressing: gather, scatter, embedding, topk
    RANDOM = "random"          # needs a seed: dropout, gaussian_noise
    STRUCTURAL = "structural"  # holds a body graph: block calls (gone after inlining),
                               # fused kernels, scans, and GETITEM reading their outputs


class Op(enum.Enum):
    def __new__(cls, name: str, kind: Kind, arity):
        obj = object.__new__(cls)
        obj._value_ = name
        obj.kind = kind
        obj.arity = arity  # number of tensor inputs; None = variadic
        return obj

    # sources
    INPUT = ("input", Kind.SOURCE, 0)
    PARAM = ("param", Kind.SOURCE, 0)
    CONST = ("const", Kind.SOURCE, 0)
    IOTA = ("iota", Kind.SOURCE, 0)
    CAUSAL_MASK = ("causal_mask", Kind.SOURCE, 0)
    # unary pointwise
    NEG = ("neg", Kind.POINTWISE, 1)
    EXP = ("exp", Kind.POINTWISE, 1)
    LOG = ("log", Kind.POINTWISE, 1)
    SQRT = ("sqrt", Kind.POINTWISE, 1)
    RSQRT = ("rsqrt", Kind.POINTWISE, 1)
    SIGMOID = ("sigmoid", Kind.POINTWISE, 1)
    TANH = ("tanh", Kind.POINTWISE, 1)
    SILU = ("silu", Kind.POINTWISE, 1)
    GELU = ("gelu", Kind.POINTWISE, 1)
    LOGSIGMOID = ("logsigmoid", Kind.POINTWISE, 1)
    SOFTPLUS = ("softplus", Kind.POINTWISE, 1)
    STOP_GRADIENT = ("stop_gradient", Kind.POINTWISE, 1)  # identity forward, zero gradient
    ERF = ("erf", Kind.POINTWISE, 1)
    SIN = ("sin", Kind.POINTWISE, 1)
    COS = ("cos", Kind.POINTWISE, 1)
    ABS = ("abs", Kind.POINTWISE, 1)
    SIGN = ("sign", Kind.POINTWISE, 1)
    ROUND = ("round", Kind.POINTWISE, 1)
    RELU = ("relu", Kind.POINTWISE, 1)
    CLAMP = ("clamp", Kind.POINTWISE, 1)
    CAST = ("cast", Kind.POINTWISE, 1)
    # binary pointwise
    ADD = ("add", Kind.POINTWISE, 2)
    SUB = ("sub", Kind.POINTWISE, 2)
    MUL = ("mul", Kind.POINTWISE, 2)
    DIV = ("div", Kind.POINTWISE, 2)
    POW = ("pow", Kind.POINTWISE, 2)
    MAX = ("maximum", Kind.POINTWISE, 2)
    MIN = ("minimum", Kind.POINTWISE, 2)
    LT = ("lt", Kind.POINTWISE, 2)
    LE = ("le", Kind.POINTWISE, 2)
    GT = ("gt", Kind.POINTWISE, 2)
    GE = ("ge", Kind.POINTWISE, 2)
    EQ = ("eq", Kind.POINTWISE, 2)
    NE = ("ne", Kind.POINTWISE, 2)
    WHERE = ("where", Kind.POINTWISE, 3)
    # reductions and scans over one axis
    SUM = ("sum", Kind.REDUCTION, 1)
    MEAN = ("mean", Kind.REDUCTION, 1)
    AMAX = ("amax", Kind.REDUCTION, 1)
    LOGSUMEXP = ("logsumexp", Kind.REDUCTION, 1)
    SOFTMAX = ("softmax", Kind.REDUCTION, 1)
    CUMSUM = ("cumsum", Kind.REDUCTION, 1)
    CUMPROD = ("cumprod", Kind.REDUCTION, 1)
    # contraction
    MATMUL = ("matmul", Kind.MATMUL, 2)
    # views / data movement
    RESHAPE = ("reshape", Kind.VIEW, 1)
    PERMUTE = ("permute", Kind.VIEW, 1)
    EXPAND = ("expand", Kind.VIEW, 1)
    SLICE = ("slice", Kind.VIEW, 1)
    CONCAT = ("concat", Kind.VIEW, None)
    # data-dependent indexing
    EMBEDDING = ("embedding", Kind.INDEX, 2)
    GATHER = ("gather", Kind.INDEX, 2)
    SCATTER_ADD = ("scatter_add", Kind.INDEX, 3)
    TOPK = ("topk", Kind.INDEX, 1)
    INDEX_COPY = ("index_copy", Kind.INDEX, 3)  # x with slices of src written at 1-D indices
    # randomness with an explicit seed
    DROPOUT = ("dropout", Kind.RANDOM, 2)
    GAUSSIAN_NOISE = ("gaussian_noise", Kind.RANDOM, 2)  # x + std * N(0, 1), training only
    # structure (removed by the inline pass)
    BLOCK = ("block", Kind.STRUCTURAL, None)
    GETITEM = ("getitem", Kind.STRUCTURAL, 1)
    FUSED = ("fused", Kind.STRUCTURAL, None)  # a kernel group made by a fusion pass
    SCAN = ("scan", Kind.STRUCTURAL, None)    # a recurrence over T with a step body (ops/scan.py)
    SCAN_BWD = ("scan_bwd", Kind.STRUCTURAL, None)  # its reverse loop, made by autodiff


UNARY = [op for op in Op if op.kind is Kind.POINTWISE and op.arity == 1
         and op not in (Op.CLAMP, Op.CAST)]
BINARY = [op for op in Op if op.kind is Kind.POINTWISE and op.arity == 2]
COMPARISONS = [Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]
REDUCTIONS = [Op.SUM, Op.MEAN, Op.AMAX, Op.LOGSUMEXP]
