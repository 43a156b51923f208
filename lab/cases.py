"""Benchmark cases: for each kernel family, its ops, shape presets, inputs, references, baselines,
and the stated count of FLOPs and bytes per op that the roofline uses.

A `Case` is one op (or module) of one family. It names the public tritonlab names it needs
(`requires`; a family not importable yet is skipped with a note) and the float64 NumPy reference
it checks against (from `kernels/<family>/reference.py`, called positionally in the op's argument
order, the convention of tree_routing/reference.py). Its `providers` are our op and the baselines
a user would pick instead (lab/baselines.py); each provider's `setup` does the untimed preparation
(layouts, quantized copies, torch.compile) and returns the zero-argument call that is timed.

Presets: "quick" (CPU, the whole run in under 2 minutes on a 2-core machine), "cpu" (the default on
a CPU: the issues' CPU targets, e.g. the tree-routing headline fff_forward T=4096 D=768 depth 8 leaf
width 16 float32 against the dense FFN of width 4096), "models" (GPU: the shapes of the issues'
speed targets).

Counting rules (the roofline's "useful work", the same for every provider of a case, whatever
extra work a baseline does):
- FLOPs: 2 per multiply-add of the op's math; activations, biases and comparisons are not counted;
  an FFT of length n counts 5 n log2 n for complex input and 2.5 n log2 n for real input (the
  conventional radix-2 count, also used for non-powers of two).
- Bytes: each input read once and each output written once, at its dtype's size; for routed ops
  only the weights of the leaves/groups/nodes that tokens reach, with uniform routing: a set of n
  weight blocks hit by m independent draws touches n (1 - (1 - 1/n)^m) blocks on average.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import baselines as B
from .kernels._accuracy import TF32_TOLERANCE, rel_error, to_numpy, tolerance
from .kernels._numpy_ref import activation as np_activation
from .kernels.fft_mixing.fallback import hermitian_filter

#: rows of the output (dim 0: tokens, or batch elements for [B, S, D] mixing) checked against the
#: reference: at most CHECK_ROWS rows and about CHECK_ELEMENTS output elements, picked at random
#: (the first and last row always). Rows of these ops are independent, so a subset is a fair check;
#: it keeps the float64 reference affordable at the GPU shapes.
CHECK_ROWS = 256
CHECK_ELEMENTS = 1 << 22

ELEMENT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANT_DTYPES = ("int8", "fp8_e4m3", "fp8_e5m2")


class Unavailable(Exception):
    """A provider cannot run here (no such torch op, hardware too old, ...): reported as skipped."""


#: our own torch fallback as a provider (a GPU report times it beside the kernels): a baseline row,
#: but never the primary one while another baseline ran (bench.finalize), since it is not what a
#: user would pick instead of tritonlab
OWN_FALLBACK = "tritonlab-torch"


@dataclass
class Prepared:
    """A provider made ready for one input set: `fn()` is what gets timed."""

    fn: Callable[[], Any]
    #: rows -> the provider's own float64 reference, when it computes a different function than the
    #: case's op (the dense FFN of equal width); None means the case's reference
    reference: Optional[Callable[[np.ndarray], Any]] = None
    #: error measure for that own reference (default: relative Frobenius error of the rows)
    error: Optional[Callable[[Any, Any, np.ndarray], tuple[float, float]]] = None
    note: str = ""


@dataclass
class Provider:
    name: str
    role: str  # "ours" | "baseline"
    setup: Callable[[dict, torch.device], Prepared]
    #: safe to capture in a CUDA graph (no host sync): in a case with a captured row of ours, a
    #: baseline that is gets a captured twin, so graph is compared with graph (_ours_for)
    graph_safe: bool = False


@dataclass
class Sweep:
    shapes: list[dict]
    dtypes: tuple[str, ...]


@dataclass
class Case:
    family: str
    kernel: str
    requires: tuple[str, ...]
    presets: dict[str, Sweep]
    make_inputs: Callable[[dict, str, torch.device, torch.Generator], dict]
    #: inputs restricted to the checked rows, as float64 NumPy -> reference object for `error`
    reference: Callable[[dict], Any]
    #: (output, reference object, rows) -> (relative error, max abs error)
    error: Callable[[Any, Any, np.ndarray], tuple[float, float]]
    tolerance: Callable[[str, torch.device], float]
    flops: Callable[[dict], float]
    bytes: Callable[[dict, str], float]
    #: which measured peak bounds this op: "fp32", "bf16", "fp16", "int8", "fp8"
    compute: Callable[[str], str]
    #: (device, include torch.compile baselines, dtype) -> our op first, then the baselines, the
    #: primary baseline (the one speedups are quoted against) first among those that run
    providers: Callable[[torch.device, bool, str], list[Provider]]
    #: inputs whose dim 0 is the output's dim 0 (subset for the check)
    row_inputs: tuple[str, ...] = ("x",)
    #: the sweep variable of the scaling plot
    size_key: str = "T"
    #: family reference functions needed ("module:function" under tritonlab.kernels)
    references: tuple[str, ...] = ()
    counting: str = ""
    rows_of: Callable[[dict], tuple[int, int]] = lambda s: (s["T"], 1)  # (rows, elements per row)
    notes: list[str] = field(default_factory=list)

    def missing(self) -> list[str]:
        """Names this case needs that are not importable yet (ops, modules, reference functions)."""
        from . import kernels

        out = []
        for n in self.requires:
            try:
                if not hasattr(kernels, n):
                    out.append(n)
            except Exception as e:  # a family caught half-written: its import fails
                out.append(f"{n} (import fails: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
        for spec in self.references:
            if _reference_fn(spec) is None:
                out.append(f"{spec.replace(':', '.')} (reference)")
        return out


# ----------------------------------------------------------------------------- helpers


def _reference_fn(spec: str) -> Optional[Callable]:
    module, name = spec.split(":")
    try:
        mod = importlib.import_module(f"tritonlab.kernels.{module}")
    except Exception:  # missing, or a family whose import fails
        return None
    return getattr(mod, name, None)


def family_reference(spec: str, *args: Any) -> Any:
    """Call a family's float64 reference positionally, in the op's argument order."""
    fn = _reference_fn(spec)
    if fn is None:
        raise Unavailable(f"reference {spec} is missing")
    return fn(*args)


def rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device=None, scale: float = 1.0) -> torch.Tensor:
    """Standard normal * scale drawn in float32 on the device, then cast."""
    t = torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


def touched(n_blocks: int, draws: float) -> float:
    """Expected number of distinct blocks among n_blocks hit by `draws` uniform draws."""
    if n_blocks <= 0 or draws <= 0:
        return 0.0
    return n_blocks * -math.expm1(draws * math.log1p(-1.0 / n_blocks)) if n_blocks > 1 else 1.0


def default_error(out: Any, ref: Any, rows: np.ndarray) -> tuple[float, float]:
    """Relative Frobenius error and max abs error of out[rows] against the reference."""
    o = to_numpy(out[torch.as_tensor(rows, device=out.device)] if isinstance(out, torch.Tensor) else np.asarray(out)[rows])
    r = np.asarray(ref, dtype=np.float64)
    err = rel_error(o, r)
    if o.shape != r.shape or not np.all(np.isfinite(o)):
        return err, math.inf
    return err, float(np.max(np.abs(o - r))) if o.size else 0.0


def float_tolerance(dtype: str, device: torch.device) -> float:
    """The shared bound by dtype; float32 on a GPU allows tf32 dots (Triton's default for fp32 tl.dot)."""
    return tolerance(FLOAT_DTYPES[dtype], tf32=device.type == "cuda")


def float_compute(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]


def _label(shape: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in shape.items())


_COMPILED: dict[Any, Callable] = {}


def compiled(fn: Callable) -> Callable:
    """torch.compile(fn), one compiled object per function (dynamic shapes after the first recompile)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def lazily_compiled(fn: Callable) -> Callable:
    """A stand-in that compiles `fn` on its first call (listing providers must stay cheap)."""
    return lambda *args: compiled(fn)(*args)


def _op(name: str) -> Callable:
    from . import kernels

    return getattr(kernels, name)


#: the provider-name suffix of a call captured in a CUDA graph and replayed
GRAPH_SUFFIX = "-cudagraph"


def ours(name: str, call: Callable[[Callable, dict, str], Any], graph_row: bool = False) -> list[Provider]:
    """Our op through backend="auto" (Triton on a GPU, the torch fallback on a CPU), and on a GPU
    also our torch fallback as a baseline. `graph_row`: on a GPU also our op captured in a CUDA
    graph ("tritonlab-cudagraph", for ops whose eager time is mostly host work: several launches
    per call); it is timed like every row (do_bench, L2 flushed before each replay), so the
    difference to the eager row is the host's launch overhead, which a graph-capturing serving
    stack does not pay. Its speedup is over the captured twins of the baselines (_ours_for)."""
    def setup(backend):
        def _setup(inp, device):
            op = _op(name)
            return Prepared(lambda: call(op, inp, backend))
        return _setup

    provs = [Provider("tritonlab", "ours", setup("auto")),
             Provider(OWN_FALLBACK, "baseline", setup("torch"))]
    if graph_row:
        provs.append(Provider("tritonlab" + GRAPH_SUFFIX, "ours", captured(setup("auto"))))
    return provs


def graph_replay(fn: Callable[[], Any], warmup: int = 2) -> Callable[[], Any]:
    """fn captured once in a CUDA graph, after `warmup` calls on a side stream (compiles, config
    lookups, allocations); the returned call replays the graph and returns the captured output
    tensor, which each replay refills."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def captured(setup: Callable[[dict, torch.device], Prepared]) -> Callable[[dict, torch.device], Prepared]:
    """A setup whose call is the given one captured in a CUDA graph and replayed (graph_replay);
    its own reference, if any, still checks it."""
    def _setup(inp, device):
        if device.type != "cuda":
            raise Unavailable("CUDA graphs need a GPU")
        prep = setup(inp, device)
        return replace(prep, fn=graph_replay(prep.fn))
    return _setup


def _ours_for(device: torch.device, provs: list[Provider]) -> list[Provider]:
    """On a CPU "auto" is the torch fallback: the fallback baseline would time the same code twice,
    and there are no CUDA graphs. On a GPU, where our op has a captured row, every graph-safe
    baseline gets one too (after all eager rows), so the captured row is compared with captured
    baselines and never with an eager one that pays the launch overhead it does not."""
    if device.type != "cuda":
        return [p for p in provs if p.name not in (OWN_FALLBACK, "tritonlab" + GRAPH_SUFFIX)]
    if not any(p.name == "tritonlab" + GRAPH_SUFFIX for p in provs):
        return provs
    eager = [p for p in provs if not p.name.endswith(GRAPH_SUFFIX)]
    twins = [Provider(p.name + GRAPH_SUFFIX, p.role, captured(p.setup)) for p in eager if p.role == "baseline" and p.graph_safe]
    return eager + [p for p in provs if p.name.endswith(GRAPH_SUFFIX)] + twins


# ----------------------------------------------------------------------------- tree routing


def _tree_inputs(shape, dtype, device, g):
    t, d, depth = shape["T"], shape["D"], shape["depth"]
    dt = FLOAT_DTYPES[dtype]
    n = 2**depth - 1
    inp = {"x": rand(g, t, d, dtype=dt, device=device),
           "node_weight": rand(g, n, d, dtype=dt, device=device, scale=d**-0.5),
           "node_bias": rand(g, n, dtype=dt, device=device, scale=0.1)}
    if "H" in shape:
        leaves, h, o = 2**depth, shape["H"], shape.get("O", d)
        inp.update(w1=rand(g, leaves, d, h, dtype=dt, device=device, scale=d**-0.5),
                   b1=rand(g, leaves, h, dtype=dt, device=device, scale=0.1),
                   w2=rand(g, leaves, h, o, dtype=dt, device=device, scale=h**-0.5),
                   b2=rand(g, leaves, o, dtype=dt, device=device, scale=0.1))
    return inp


def _path_inputs(shape, dtype, device, g):
    t, d, depth, o = shape["T"], shape["D"], shape["depth"], shape.get("O", shape["D"])
    dt = FLOAT_DTYPES[dtype]
    n = 2 ** (depth + 1) - 1
    return {"x": rand(g, t, d, dtype=dt, device=device),
            "w_in": rand(g, n, d, dtype=dt, device=device, scale=d**-0.5),
            "w_out": rand(g, n, o, dtype=dt, device=device, scale=(depth + 1) ** -0.5),
            "b_in": rand(g, n, dtype=dt, device=device, scale=0.1)}


def _tie_threshold(np_inp) -> float:
    """A token whose |logit| at some node is within this fraction of ||x|| ||w_node|| may take either
    child (a sign decision inside rounding). float32 math on a CPU: 1e-5; on a GPU, where Triton's
    float32 dots may run in tf32 (relative error ~5e-4), and for half inputs: 1e-3."""
    return 1e-5 if (np_inp["_dtype"] == "float32" and np_inp["_device"] == "cpu") else 1e-3


def _route_margin(np_inp, w_key, b_key):
    from .kernels.tree_routing import reference as ref

    return ref.route_margin_ref(np_inp["x"], np_inp[w_key], np_inp[b_key])


def _tree_route_reference(np_inp):
    leaf = family_reference("tree_routing.reference:tree_route_ref", np_inp["x"], np_inp["node_weight"], np_inp["node_bias"])
    return leaf, _route_margin(np_inp, "node_weight", "node_bias") < _tie_threshold(np_inp)


def _tree_route_error(out, ref, rows):
    leaf, tie = ref
    got = to_numpy(out[torch.as_tensor(rows, device=out.device)]).astype(np.int64)
    wrong = (got != leaf) & ~tie
    return (float(wrong.mean()) if wrong.size else 0.0), float(wrong.sum())


def _with_ties(ref_fn):
    def reference(np_inp):
        w_key, b_key = ("w_in", "b_in") if "w_in" in np_inp else ("node_weight", "node_bias")
        return ref_fn(np_inp), _route_margin(np_inp, w_key, b_key) < _tie_threshold(np_inp)
    return reference


def _error_without_ties(out, ref, rows):
    """Relative error over the rows whose routing is not a near-tie (those may legitimately differ)."""
    y_ref, tie = ref
    keep = ~tie
    return default_error(out, y_ref[keep], np.asarray(rows)[keep])


def _fff_reference(np_inp):
    return family_reference("tree_routing.reference:fff_forward_ref", *(np_inp[k] for k in (
        "x", "node_weight", "node_bias", "w1", "b1", "w2", "b2")), "relu")


def _path_reference(np_inp):
    return family_reference("tree_routing.reference:fff_path_forward_ref", np_inp["x"], np_inp["w_in"],
                            np_inp["w_out"], np_inp["b_in"], "gelu")


def dense_ffn_provider(width_of: Callable[[dict], int], activation: str, name: str = "dense-ffn") -> Provider:
    """A dense FFN D -> W -> O of the given total width (torch matmuls: cuBLAS on a GPU)."""
    def setup(inp, device):
        x = inp["x"]
        d, o = x.shape[1], inp["_O"]
        w = width_of(inp)
        g = torch.Generator(device=device).manual_seed(int(inp["_seed"]) + 1)
        w1, b1 = rand(g, d, w, dtype=x.dtype, device=device, scale=d**-0.5), rand(g, w, dtype=x.dtype, device=device, scale=0.1)
        w2, b2 = rand(g, w, o, dtype=x.dtype, device=device, scale=w**-0.5), rand(g, o, dtype=x.dtype, device=device, scale=0.1)

        def reference(rows):
            xr = to_numpy(x[torch.as_tensor(rows, device=x.device)])
            h = np_activation(xr @ to_numpy(w1) + to_numpy(b1), activation)
            return h @ to_numpy(w2) + to_numpy(b2)

        return Prepared(lambda: B.dense_ffn(x, w1, b1, w2, b2, activation), reference, note=f"width {w}")
    return Provider(name, "baseline", setup, graph_safe=True)


def _tree_providers(kind: str):
    def providers(device: torch.device, compile_baselines: bool, dtype: str) -> list[Provider]:
        if kind == "route":
            provs = ours("tree_route", lambda op, i, b: op(i["x"], i["node_weight"], i["node_bias"], backend=b),
                         graph_row=True)
            provs.append(Provider("torch-dense-logits", "baseline", lambda i, d: Prepared(
                lambda: B.tree_route_dense_logits(i["x"], i["node_weight"], i["node_bias"])), graph_safe=True))
            naive = B.tree_route_naive
            args = ("x", "node_weight", "node_bias")
        elif kind == "fff":
            provs = ours("fff_forward", lambda op, i, b: op(*(i[k] for k in (
                "x", "node_weight", "node_bias", "w1", "b1", "w2", "b2")), "relu", backend=b),
                graph_row=True)
            provs.append(dense_ffn_provider(lambda i: i["w1"].shape[0] * i["w1"].shape[2], "relu"))
            naive = B.fff_forward_naive
            args = ("x", "node_weight", "node_bias", "w1", "b1", "w2", "b2", "relu")
        else:
            provs = ours("fff_path_forward", lambda op, i, b: op(i["x"], i["w_in"], i["w_out"], i["b_in"], "gelu", backend=b))
            provs.append(dense_ffn_provider(lambda i: i["w_in"].shape[0], "gelu"))
            naive = B.fff_path_forward_naive
            args = ("x", "w_in", "w_out", "b_in", "gelu")

        def call_with(fn):
            return lambda i, d: Prepared(lambda: fn(*(i[a] if a in i else a for a in args)))

        provs.append(Provider("torch-naive", "baseline", call_with(naive), graph_safe=True))  # no host sync
        if compile_baselines:
            provs.append(Provider("torch.compile-naive", "baseline", call_with(lazily_compiled(naive))))
        return _ours_for(device, provs)
    return providers


def _fff_flops(s):
    o = s.get("O", s["D"])
    return 2.0 * s["T"] * (s["D"] * s["depth"] + s["D"] * s["H"] + s["H"] * o)


def _fff_bytes(s, dtype):
    e, t, d, depth, h = ELEMENT_BYTES[dtype], s["T"], s["D"], s["depth"], s["H"]
    o = s.get("O", d)
    nodes = sum(touched(2**lvl, t) for lvl in range(depth)) * (d + 1)
    leaves = touched(2**depth, t) * (d * h + h + h * o + o)
    return e * (t * d + t * o + nodes + leaves)


def _route_bytes(s, dtype):
    e, t, d, depth = ELEMENT_BYTES[dtype], s["T"], s["D"], s["depth"]
    return e * (t * d + sum(touched(2**lvl, t) for lvl in range(depth)) * (d + 1)) + 4 * t


def _path_flops(s):
    return 2.0 * s["T"] * (s["depth"] + 1) * (s["D"] + s.get("O", s["D"]))


def _path_bytes(s, dtype):
    e, t, d, depth = ELEMENT_BYTES[dtype], s["T"], s["D"], s["depth"]
    o = s.get("O", d)
    return e * (t * d + t * o + sum(touched(2**lvl, t) for lvl in range(depth + 1)) * (d + 1 + o))


def _with_out_width(make):
    """Record the output width O for the dense-FFN baseline's setup."""
    def make_inputs(shape, dtype, device, g):
        inp = make(shape, dtype, device, g)
        inp["_O"] = shape.get("O", shape["D"])
        return inp
    return make_inputs


_TREE = dict(family="tree_routing", compute=float_compute, tolerance=float_tolerance)

TREE_CASES = [
    Case(kernel="fff_forward", requires=("fff_forward",),
         presets={"quick": Sweep([{"T": t, "D": 768, "depth": 8, "H": 16} for t in (128, 512)], ("float32",)),
                  "cpu": Sweep([{"T": t, "D": 768, "depth": 8, "H": 16} for t in (16, 256, 1024, 4096)], ("float32",)),
                  "models": Sweep([{"T": t, "D": 768, "depth": 8, "H": 16} for t in (1, 64, 1024, 16384)]
                                  + [{"T": 16, "D": 4096, "depth": 6, "H": 64}], ("bfloat16",))},
         make_inputs=_with_out_width(_tree_inputs), reference=_with_ties(_fff_reference), error=_error_without_ties,
         flops=_fff_flops, bytes=_fff_bytes, providers=_tree_providers("fff"),
         references=("tree_routing.reference:fff_forward_ref",),
         counting="FLOPs 2T(D*depth + D*H + H*O); bytes x, y, the nodes and leaves tokens reach "
                  "(uniform routing); the dense FFN baseline has width 2**depth * H.", **_TREE),
    Case(kernel="tree_route", requires=("tree_route",),
         presets={"quick": Sweep([{"T": 512, "D": 768, "depth": 8}], ("float32",)),
                  "cpu": Sweep([{"T": t, "D": 768, "depth": 8} for t in (1024, 4096)]
                               + [{"T": 4096, "D": 1024, "depth": 11}], ("float32",)),
                  "models": Sweep([{"T": t, "D": 768, "depth": 8} for t in (64, 16384)]
                                  + [{"T": 4096, "D": 1024, "depth": 11}], ("bfloat16",))},
         make_inputs=_with_out_width(_tree_inputs), reference=_tree_route_reference, error=_tree_route_error,
         flops=lambda s: 2.0 * s["T"] * s["D"] * s["depth"], bytes=_route_bytes, providers=_tree_providers("route"),
         references=("tree_routing.reference:tree_route_ref",),
         counting="FLOPs 2T*D*depth (one dot per level); bytes x, int32 leaves, the node rows reached. "
                  "Error: fraction of tokens on another leaf than the reference, near-ties excluded "
                  "(tolerance 0).", **dict(_TREE, tolerance=lambda dtype, device: 0.0)),
    Case(kernel="fff_path_forward", requires=("fff_path_forward",),
         presets={"quick": Sweep([{"T": 512, "D": 768, "depth": 11}], ("float32",)),
                  "cpu": Sweep([{"T": t, "D": 768, "depth": 11} for t in (1024, 4096)], ("float32",)),
                  "models": Sweep([{"T": t, "D": 768, "depth": 11} for t in (64, 16384)], ("bfloat16",))},
         make_inputs=_with_out_width(_path_inputs), reference=_with_ties(_path_reference), error=_error_without_ties,
         flops=_path_flops, bytes=_path_bytes, providers=_tree_providers("path"),
         references=("tree_routing.reference:fff_path_forward_ref",),
         counting="FLOPs 2T(depth+1)(D+O); bytes x, y and the w_in/w_out rows reached; the dense FFN "
                  "baseline has width 2**(depth+1) - 1 (UltraFastBERT's comparison).", **_TREE),
]


# ----------------------------------------------------------------------------- grouped GEMM


def _grouped_inputs(shape, dtype, device, g):
    t, d, h, groups, k = shape["T"], shape["D"], shape["H"], shape["G"], shape["k"]
    dt = FLOAT_DTYPES[dtype]
    # distinct groups per token (top-k of random scores), softmax route weights for k > 1
    scores = torch.rand(t, groups, generator=g, device=device)
    idx = scores.topk(k, dim=1).indices
    inp = {"x": rand(g, t, d, dtype=dt, device=device),
           "indices": idx[:, 0].contiguous() if k == 1 else idx.contiguous(),
           "route_weights": None if k == 1 else torch.softmax(rand(g, t, k, device=device), 1).to(dt),
           "w1": rand(g, groups, d, h, dtype=dt, device=device, scale=d**-0.5),
           "b1": rand(g, groups, h, dtype=dt, device=device, scale=0.1),
           "w2": rand(g, groups, h, d, dtype=dt, device=device, scale=h**-0.5),
           "b2": rand(g, groups, d, dtype=dt, device=device, scale=0.1)}
    inp["activation"] = shape.get("act", "silu")
    return inp


def _grouped_mm_setup(mlp: bool):
    """torch._grouped_mm, trying the weights as they are and then column-major (what some builds need)."""
    def setup(inp, device):
        if not hasattr(torch, "_grouped_mm"):
            raise Unavailable("torch._grouped_mm is missing in this torch")
        def colmajor(w):
            return w.transpose(-2, -1).contiguous().transpose(-2, -1)
        fn = B.leaf_mlp_grouped_mm if mlp else B.gms_grouped_mm
        w1, w2 = inp["w1"], inp["w2"]
        errors = []
        for layout in ("row-major", "column-major"):
            if layout == "column-major":
                w1, w2 = colmajor(w1), colmajor(w2)
            if mlp:
                call = (lambda a, b: lambda: fn(inp["x"], inp["indices"], a, inp["b1"], b, inp["b2"], inp["activation"],
                                                 inp["route_weights"]))(w1, w2)
            else:
                call = (lambda a: lambda: fn(inp["x"], a, inp["indices"], inp["b1"], inp["route_weights"], inp["activation"]))(w1)
            try:
                call()
                return Prepared(call, note=f"weights {layout}")
            except RuntimeError as e:  # unsupported dtype / layout / architecture
                errors.append(f"{layout}: {str(e).splitlines()[0][:120]}")
        raise Unavailable("torch._grouped_mm: " + "; ".join(errors))
    return setup


def _grouped_providers(mlp: bool):
    def providers(device, compile_baselines, dtype):
        if mlp:
            provs = ours("leaf_mlp", lambda op, i, b: op(i["x"], i["indices"], i["w1"], i["b1"], i["w2"], i["b2"],
                                                         i["activation"], route_weights=i["route_weights"], backend=b),
                         graph_row=True)
            loop = lambda i, d: Prepared(lambda: B.leaf_mlp_expert_loop(
                i["x"], i["indices"], i["w1"], i["b1"], i["w2"], i["b2"], i["activation"], i["route_weights"]))
        else:
            provs = ours("gather_matmul_scatter", lambda op, i, b: op(
                i["x"], i["w1"], i["indices"], bias=i["b1"], route_weights=i["route_weights"],
                activation=i["activation"], backend=b), graph_row=True)
            loop = lambda i, d: Prepared(lambda: B.gms_expert_loop(
                i["x"], i["w1"], i["indices"], i["b1"], i["route_weights"], i["activation"]))
        # torch._grouped_mm is the GPU's grouped GEMM (its CPU version is a slow reference path whose
        # first call alone takes seconds); on a CPU the loop over experts is what a user runs
        if device.type == "cuda":
            provs.append(Provider("torch._grouped_mm", "baseline", _grouped_mm_setup(mlp)))
        provs.append(Provider("expert-loop", "baseline", loop))
        return _ours_for(device, provs)
    return providers


def _gms_reference(np_inp):
    return family_reference("grouped_gemm.reference:gather_matmul_scatter_ref", np_inp["x"], np_inp["w1"],
                            np_inp["indices"], np_inp["b1"], np_inp["route_weights"], np_inp["activation"])


def _leaf_mlp_reference(np_inp):
    return family_reference("grouped_gemm.reference:leaf_mlp_ref", np_inp["x"], np_inp["indices"], np_inp["w1"],
                            np_inp["b1"], np_inp["w2"], np_inp["b2"], np_inp["activation"], np_inp["route_weights"])


def _grouped_flops(mlp):
    return lambda s: 2.0 * s["T"] * s["k"] * s["D"] * s["H"] * (2 if mlp else 1)


def _grouped_bytes(mlp):
    def count(s, dtype):
        e, t, d, h, k = ELEMENT_BYTES[dtype], s["T"], s["D"], s["H"], s["k"]
        out = d if mlp else h
        weights = (d * h + h + h * d + d) if mlp else (d * h + h)
        routing = t * k * (8 + (e if k > 1 else 0))
        return e * (t * d + t * out + touched(s["G"], t * k) * weights) + routing
    return count


_MOE_MODELS = [{"T": t, "G": 8, "k": 2, "D": 4096, "H": 14336} for t in (64, 4096)] + \
    [{"T": t, "G": 64, "k": 8, "D": 2048, "H": 1408} for t in (64, 4096)] + \
    [{"T": t, "G": 256, "k": 1, "D": 768, "H": 64, "act": "relu"} for t in (64, 1024, 16384)]
_MOE_CPU = [{"T": t, "G": 256, "k": 1, "D": 768, "H": 64, "act": "relu"} for t in (1024, 4096)] + \
    [{"T": 1024, "G": 8, "k": 2, "D": 1024, "H": 3584}, {"T": 1024, "G": 64, "k": 8, "D": 512, "H": 352}]
_MOE_QUICK = [{"T": 512, "G": 256, "k": 1, "D": 768, "H": 64, "act": "relu"},
              {"T": 256, "G": 8, "k": 2, "D": 512, "H": 1024}]

GROUPED_CASES = [
    Case(family="grouped_gemm", kernel=kernel, requires=(kernel,),
         presets={"quick": Sweep(_MOE_QUICK, ("float32",)), "cpu": Sweep(_MOE_CPU, ("float32",)),
                  "models": Sweep(_MOE_MODELS, ("bfloat16",))},
         make_inputs=_grouped_inputs, reference=_leaf_mlp_reference if mlp else _gms_reference, error=default_error,
         tolerance=float_tolerance, flops=_grouped_flops(mlp), bytes=_grouped_bytes(mlp), compute=float_compute,
         providers=_grouped_providers(mlp), row_inputs=("x", "indices", "route_weights"),
         references=(f"grouped_gemm.reference:{kernel}_ref",),
         rows_of=(lambda s: (s["T"], s["D"])) if mlp else (lambda s: (s["T"], s["H"])),
         counting=("FLOPs 2T*k*D*H per GEMM" + (" (two GEMMs)" if mlp else "") +
                   "; bytes x, y, the weights of the groups reached, indices (int64) and route weights. "
                   "Shapes: Mixtral-like (G=8, k=2), fine-grained experts (G=64, k=8), FFF leaves (G=256, k=1)."))
    for kernel, mlp in (("gather_matmul_scatter", False), ("leaf_mlp", True))
]


# ----------------------------------------------------------------------------- quantized


def _x_dtype(device: torch.device) -> torch.dtype:
    """Activations are bf16 on a GPU, float32 on a CPU (CPU bf16 math is slow and not what CPU users run)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _quantize_inputs(shape, dtype, device, g):
    return {"x": rand(g, shape["M"], shape["N"], dtype=FLOAT_DTYPES[shape["x"]], device=device), "qdtype": dtype}


def _dequantized(q, scale):
    return q.to(torch.float64) * scale.to(torch.float64)


def _quantize_error(out, ref, rows):
    q, scale = out
    idx = torch.as_tensor(rows, device=q.device)
    got = to_numpy(_dequantized(q[idx], scale[idx] if scale.dim() and scale.shape[0] == q.shape[0] else scale))
    ref_q, ref_scale = ref
    want = np.asarray(ref_q).astype(np.float64) * np.asarray(ref_scale, dtype=np.float64)
    err = rel_error(got, want)
    return err, (float(np.max(np.abs(got - want))) if got.shape == want.shape and got.size else math.inf)


def _quantize_providers(device, compile_baselines, dtype):
    provs = ours("quantize", lambda op, i, b: op(i["x"], i["qdtype"], "row", backend=b))
    provs.append(Provider("torch-formula", "baseline", lambda i, d: Prepared(lambda: B.quantize_rows(i["x"], i["qdtype"])),
                          graph_safe=True))
    if compile_baselines:
        provs.append(Provider("torch.compile-formula", "baseline",
                              lambda i, d: Prepared(lambda: compiled(B.quantize_rows)(i["x"], i["qdtype"])), graph_safe=True))
    return _ours_for(device, provs)


def _scaled_inputs(shape, dtype, device, g):
    m, n, k = shape["M"], shape["N"], shape["K"]
    if dtype == "int8":
        a_q = torch.randint(-127, 128, (m, k), generator=g, device=device, dtype=torch.int8)
        b_q = torch.randint(-127, 128, (n, k), generator=g, device=device, dtype=torch.int8)
    else:
        qd = B.QDTYPES[dtype]
        a_q = rand(g, m, k, device=device, scale=B.QMAX[dtype] / 4).clamp_(-B.QMAX[dtype], B.QMAX[dtype]).to(qd)
        b_q = rand(g, n, k, device=device, scale=B.QMAX[dtype] / 4).clamp_(-B.QMAX[dtype], B.QMAX[dtype]).to(qd)
    qmax = B.QMAX[dtype]
    a_scale = (torch.rand(m, 1, generator=g, device=device) + 0.5) / (qmax * k**0.5)
    b_scale = (torch.rand(1, n, generator=g, device=device) + 0.5) / qmax
    return {"a_q": a_q, "a_scale": a_scale, "b_q": b_q, "b_scale": b_scale,
            "bias": rand(g, n, dtype=torch.bfloat16, device=device, scale=0.1), "qdtype": dtype}


def _scaled_providers(device, compile_baselines, dtype):
    provs = ours("scaled_matmul", lambda op, i, b: op(i["a_q"], i["a_scale"], i["b_q"], i["b_scale"], bias=i["bias"],
                                                      out_dtype=torch.bfloat16, backend=b))

    def torch_native(i, d):
        b_t = i["b_q"].T  # [K, N] column-major: the layout cuBLASLt wants for the second operand
        if i["qdtype"] == "int8":
            fn = lambda: B.int_mm_scaled(i["a_q"], i["a_scale"], b_t, i["b_scale"], torch.bfloat16) + i["bias"]
            name = "torch._int_mm"
        else:
            if not hasattr(torch, "_scaled_mm"):
                raise Unavailable("torch._scaled_mm is missing")
            fn = lambda: B.scaled_mm_rowwise(i["a_q"], i["a_scale"], b_t, i["b_scale"], torch.bfloat16, i["bias"])
            name = "torch._scaled_mm"
            try:
                fn()
            except RuntimeError:  # a torch build whose row-wise _scaled_mm takes no bias: add it after
                fn = lambda: B.scaled_mm_rowwise(i["a_q"], i["a_scale"], b_t, i["b_scale"], torch.bfloat16) + i["bias"]
        try:
            fn()
        except RuntimeError as e:
            raise Unavailable(f"{name}: {str(e).splitlines()[0][:160]}") from e
        return Prepared(fn)

    def float_matmul(i, d):
        # the unquantized GEMM a user would keep: the same values in bf16 (GPU) / fp32 (CPU)
        dt = _x_dtype(d)
        a = (i["a_q"].float() * i["a_scale"]).to(dt)
        b = (i["b_q"].float() * i["b_scale"].reshape(-1, 1)).to(dt)
        bias = i["bias"].to(dt)

        def reference(rows):
            return to_numpy(a[torch.as_tensor(rows, device=a.device)]) @ to_numpy(b).T + to_numpy(bias)

        return Prepared(lambda: torch.addmm(bias, a, b.T), reference)

    name = "torch._int_mm" if dtype == "int8" else "torch._scaled_mm"
    provs += [Provider(name, "baseline", torch_native, graph_safe=True),
              Provider("torch.matmul-bf16" if device.type == "cuda" else "torch.matmul-fp32", "baseline", float_matmul,
                       graph_safe=True)]
    return _ours_for(device, provs)


def _scaled_reference(np_inp):
    return family_reference("quantized.reference:scaled_matmul_ref", np_inp["a_q"], np_inp["a_scale"], np_inp["b_q"],
                            np_inp["b_scale"], np_inp["bias"], None)


def _ffn_inputs(shape, dtype, device, g):
    t, d, h = shape["T"], shape["D"], shape["H"]
    l1, l2 = torch.nn.Linear(d, h, device=device), torch.nn.Linear(h, d, device=device)
    with torch.no_grad():
        for lin, fan_in in ((l1, d), (l2, h)):
            lin.weight.copy_(rand(g, *lin.weight.shape, device=device, scale=fan_in**-0.5))
            lin.bias.copy_(rand(g, *lin.bias.shape, device=device, scale=0.1))
    return {"x": rand(g, t, d, dtype=FLOAT_DTYPES[shape["x"]], device=device), "linear1": l1, "linear2": l2,
            "qdtype": dtype, "activation": "gelu"}


def _ffn_reference(np_inp):
    l1, l2 = np_inp["linear1"], np_inp["linear2"]
    h = np_activation(np_inp["x"] @ to_numpy(l1.weight).T + to_numpy(l1.bias), np_inp["activation"])
    return h @ to_numpy(l2.weight).T + to_numpy(l2.bias)


def _ffn_providers(device, compile_baselines, dtype):
    def ours_setup(i, d):
        module = _op("QuantizedFFN").from_float(i["linear1"], i["linear2"], i["activation"], i["qdtype"])
        module.eval()

        def run():
            with torch.no_grad():
                return module(i["x"])
        return Prepared(run)

    def float_ffn(i, d):
        dt = i["x"].dtype
        w = [t.detach().to(dt) for t in (i["linear1"].weight, i["linear1"].bias, i["linear2"].weight, i["linear2"].bias)]
        return Prepared(lambda: B.linear_ffn(i["x"], w[0], w[1], w[2], w[3], i["activation"]))

    return [Provider("tritonlab", "ours", ours_setup),
            Provider("ffn-bf16" if device.type == "cuda" else "ffn-fp32", "baseline", float_ffn, graph_safe=True)]


#: QuantizedFFN's error against the float64 FFN of the float weights: the quantization bound
#: (per-token x and per-channel weights, two GEMMs). int8 rounding error is ~1% per operand,
#: fp8 e4m3 (3 mantissa bits) ~4%, fp8 e5m2 ~8%.
QUANT_FFN_BOUND = {"int8": 5e-2, "fp8_e4m3": 0.15, "fp8_e5m2": 0.3}


def _quant_compute(dtype):
    return "int8" if dtype == "int8" else "fp8"


QUANT_CASES = [
    Case(family="quantized", kernel="quantize", requires=("quantize",),
         presets={"quick": Sweep([{"M": 1024, "N": 1024, "x": "float32"}], ("int8", "fp8_e4m3")),
                  "cpu": Sweep([{"M": m, "N": 4096, "x": "float32"} for m in (1024, 4096)], ("int8", "fp8_e4m3")),
                  "models": Sweep([{"M": m, "N": m, "x": "bfloat16"} for m in (4096, 8192)], ("int8", "fp8_e4m3"))},
         make_inputs=_quantize_inputs, error=_quantize_error,
         reference=lambda i: family_reference("quantized.reference:quantize_ref", i["x"], i["qdtype"], "row"),
         tolerance=lambda dtype, device: 1e-3, flops=lambda s: 3.0 * s["M"] * s["N"],
         bytes=lambda s, dtype: s["M"] * s["N"] * (1 + ELEMENT_BYTES[s["x"]]) + 4 * s["M"],
         compute=lambda dtype: "fp32", providers=_quantize_providers, size_key="M",
         references=("quantized.reference:quantize_ref",), rows_of=lambda s: (s["M"], s["N"]),
         counting="Row granularity. FLOPs 3 per element (abs-max, scale, round); bytes x (bf16 on a GPU; "
                  "float32 on a CPU), q (1 byte) and the float32 scales. Error: relative error of "
                  "q * scale against the reference's q * scale (tolerance 1e-3: a rounding tie may differ)."),
    Case(family="quantized", kernel="scaled_matmul", requires=("scaled_matmul",),
         presets={"quick": Sweep([{"M": 512, "N": 512, "K": 512}], ("int8", "fp8_e4m3")),
                  "cpu": Sweep([{"M": n, "N": n, "K": n} for n in (512, 1024)], ("int8", "fp8_e4m3")),
                  "models": Sweep([{"M": 8192, "N": 8192, "K": 8192}, {"M": 4096, "N": 14336, "K": 4096},
                                   {"M": 64, "N": 14336, "K": 4096}], ("int8", "fp8_e4m3"))},
         make_inputs=_scaled_inputs, reference=_scaled_reference, error=default_error,
         tolerance=lambda dtype, device: tolerance(torch.bfloat16), flops=lambda s: 2.0 * s["M"] * s["N"] * s["K"],
         bytes=lambda s, dtype: s["K"] * (s["M"] + s["N"]) + 2 * s["M"] * s["N"] + 4 * (s["M"] + s["N"]) + 2 * s["N"],
         compute=_quant_compute, providers=_scaled_providers, row_inputs=("a_q", "a_scale"), size_key="M",
         references=("quantized.reference:scaled_matmul_ref",), rows_of=lambda s: (s["M"], s["N"]),
         counting="Row-wise scales [M, 1] and [1, N], bf16 bias and output. FLOPs 2MNK; bytes the "
                  "1-byte operands, the bf16 output and bias, the float32 scales. Tolerance: bf16 output (1e-2)."),
    Case(family="quantized", kernel="QuantizedFFN", requires=("QuantizedFFN",),
         presets={"quick": Sweep([{"T": 128, "D": 512, "H": 2048, "x": "float32"}], ("int8",)),
                  "cpu": Sweep([{"T": 1024, "D": 1024, "H": 4096, "x": "float32"}], ("int8", "fp8_e4m3")),
                  "models": Sweep([{"T": t, "D": 4096, "H": 14336, "x": "bfloat16"} for t in (64, 4096)],
                                  ("int8", "fp8_e4m3"))},
         make_inputs=_ffn_inputs, reference=_ffn_reference, error=default_error,
         tolerance=lambda dtype, device: QUANT_FFN_BOUND[dtype], flops=lambda s: 4.0 * s["T"] * s["D"] * s["H"],
         bytes=lambda s, dtype: 2 * s["D"] * s["H"] + 2 * ELEMENT_BYTES[s["x"]] * s["T"] * s["D"] + 4 * (s["D"] + s["H"]),
         compute=_quant_compute, providers=_ffn_providers, rows_of=lambda s: (s["T"], s["D"]),
         counting="D -> H -> D with gelu, bias. FLOPs 4T*D*H; bytes the 1-byte weights, x and y "
                  "and the scales. Checked against the float64 FFN of the float weights within the "
                  f"quantization bound {QUANT_FFN_BOUND}; the float FFN baseline (bf16 on a GPU, fp32 on a "
                  "CPU) against the same reference at its dtype's tolerance."),
]


# ----------------------------------------------------------------------------- FFT mixing


def _fft_inputs(shape, dtype, device, g):
    b, s, d = shape["B"], shape["S"], shape["D"]
    dt = FLOAT_DTYPES[dtype]
    n = s // 2 + 1
    # a filter that is the spectrum of a real kernel: no imaginary part at DC and Nyquist, where numpy's
    # irfft (our ops' definition) drops it and cuFFT's C2R does not (the torch.fft baseline then missed
    # the reference by 1/sqrt(S) on the H100)
    filt = hermitian_filter(torch.complex(rand(g, n, d, device=device), rand(g, n, d, device=device)), s,
                            torch.float32)
    return {"x": rand(g, b, s, d, dtype=dt, device=device), "filt": filt,
            "k": rand(g, s, d, dtype=dt, device=device, scale=s**-0.5)}


def _log2(n):
    return math.log2(max(n, 2))


def _fft_flops(kind):
    def count(sh):
        b, s, d = sh["B"], sh["S"], sh["D"]
        if kind == "fnet":
            # real x: only the D/2 + 1 columns of its half spectrum are independent along S
            return b * s * 2.5 * d * _log2(d) + b * (d // 2 + 1) * 5.0 * s * _log2(s)
        n = 2 * s if kind == "conv" else s
        per_column = 2 * 2.5 * n * _log2(n) + 6.0 * (n // 2 + 1)
        return b * d * per_column + (d * 2.5 * n * _log2(n) if kind == "conv" else 0.0)
    return count


def _fft_bytes(kind):
    def count(sh, dtype):
        e, b, s, d = ELEMENT_BYTES[dtype], sh["B"], sh["S"], sh["D"]
        extra = {"fnet": 0, "filter": 8 * (s // 2 + 1) * d, "conv": e * s * d}[kind]
        return 2 * e * b * s * d + extra
    return count


def _fft_providers(kind):
    def providers(device, compile_baselines, dtype):
        if kind == "fnet":
            provs = ours("fnet_mix", lambda op, i, b: op(i["x"], backend=b))
            base = lambda i, d: Prepared(lambda: B.fnet_fft(i["x"]))
        elif kind == "filter":
            provs = ours("spectral_filter", lambda op, i, b: op(i["x"], i["filt"], backend=b))
            base = lambda i, d: Prepared(lambda: B.spectral_filter_fft(i["x"], i["filt"]))
        else:
            provs = ours("fft_conv", lambda op, i, b: op(i["x"], i["k"], causal=True, backend=b))
            base = lambda i, d: Prepared(lambda: B.fft_conv_fft(i["x"], i["k"], True))
        provs.append(Provider("torch.fft", "baseline", base, graph_safe=True))
        return _ours_for(device, provs)
    return providers


def _fft_reference(kind):
    def reference(i):
        if kind == "fnet":
            return family_reference("fft_mixing.reference:fnet_mix_ref", i["x"])
        if kind == "filter":
            return family_reference("fft_mixing.reference:spectral_filter_ref", i["x"], i["filt"])
        return family_reference("fft_mixing.reference:fft_conv_ref", i["x"], i["k"], True)
    return reference


def _fft_tolerance(dtype, device):
    # float32: the DFT-as-matmul kernels may run tf32 dots on a GPU; FFT rounding grows with log S
    return TF32_TOLERANCE if dtype == "float32" else tolerance(FLOAT_DTYPES[dtype])


FFT_CASES = [
    Case(family="fft_mixing", kernel=kernel, requires=(kernel,),
         presets={"quick": Sweep([{"B": 4, "S": s, "D": 256} for s in (256, 1024)], ("float32",)),
                  "cpu": Sweep([{"B": 8, "S": s, "D": 768} for s in (256, 1000, 1024, 4096)], ("float32",)),
                  "models": Sweep([{"B": 64, "S": s, "D": 768} for s in (256, 1024, 4096, 16384)], ("bfloat16",))},
         make_inputs=_fft_inputs, reference=_fft_reference(kind), error=default_error, tolerance=_fft_tolerance,
         flops=_fft_flops(kind), bytes=_fft_bytes(kind), compute=float_compute, providers=_fft_providers(kind),
         size_key="S", references=(f"fft_mixing.reference:{kernel}_ref",), rows_of=lambda s: (s["B"], s["S"] * s["D"]),
         counting={"fnet": "FLOPs: a real FFT along D (2.5 D log2 D per row) and a complex FFT along S "
                           "(5 S log2 S per column) of the D/2 + 1 columns of its half spectrum (the others "
                           "mirror them for real x); bytes x and y.",
                   "filter": "FLOPs: rfft and irfft along S (2 x 2.5 S log2 S per column) and the complex "
                             "multiply (6 per bin); bytes x, y and the complex64 filter.",
                   "conv": "Causal: transforms of length 2S (x, the kernel, the inverse) and the multiply; "
                           "bytes x, y and the kernel."}[kind])
    for kernel, kind in (("fnet_mix", "fnet"), ("spectral_filter", "filter"), ("fft_conv", "conv"))
]

#: every case, in report order
CASES: list[Case] = TREE_CASES + GROUPED_CASES + QUANT_CASES + FFT_CASES
FAMILIES = ("tree_routing", "grouped_gemm", "quantized", "fft_mixing")
PRESETS = ("quick", "cpu", "models")


def shape_label(shape: dict) -> str:
    return _label(shape)


def select(kernels: Optional[list[str]] = None, cases: Optional[list[Case]] = None) -> list[Case]:
    """Cases matching any of `kernels` (a family name or an op name); all when None/empty."""
    cases = CASES if cases is None else cases
    if not kernels:
        return list(cases)
    wanted = set(kernels)
    unknown = wanted - {c.family for c in cases} - {c.kernel for c in cases}
    if unknown:
        names = sorted({c.family for c in cases} | {c.kernel for c in cases})
        raise ValueError(f"--kernel: unknown {sorted(unknown)}; choose from {names}")
    return [c for c in cases if c.family in wanted or c.kernel in wanted]
