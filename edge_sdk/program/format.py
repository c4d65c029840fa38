"""The edge program: what the cloud compiles and a torch-free device executes (``edge.engine: onnxruntime``).

An :class:`EdgeProgram` is a manifest (JSON), ONNX graphs (a train step per trainer, feature/logit
extraction) and the initial model state, packed as one safetensors blob (graphs as uint8 arrays, the
manifest as metadata). Its identity is the SHA-256 of that blob: the runtime announces the digest in its
run recipe (on the ACL-protected control topic) and sends the blob on the device's downlink; a device
accepts a blob only if it hashes to the announced digest and every graph passes :func:`check_graph`.

A graph is code to a device, so :func:`check_graph` admits only the standard ONNX operator domains (no
custom or vendor operators, no model-local functions), no external-data references, no sparse or
subgraph tricks it does not understand, and bounded sizes. See ``docs/EDGE_RUNTIME.md``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import safetensors.numpy

PROGRAM_FORMAT = "edgefl-edge-program/1"
MAX_PROGRAM_BYTES = 64 << 20          # a whole program (graphs + initial state)
MAX_GRAPH_BYTES = 32 << 20
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
GRAPH_PREFIX, STATE_PREFIX = "graph.", "state."


class ProgramError(ValueError):
    """An edge program is malformed, not the one announced, or uses what a device must not run."""


@dataclass
class EdgeProgram:
    """``manifest``: trainer, optimizer, tensor names/shapes and each graph's inputs/outputs (see
    :mod:`edge_sdk.program.compile`); ``graphs``: name -> serialized ONNX ModelProto; ``state``: the initial
    parameters and buffers (name -> array, the edge model's ``state_dict`` names)."""

    manifest: dict
    graphs: dict[str, bytes]
    state: dict[str, np.ndarray] = field(default_factory=dict)


def pack_program(program: EdgeProgram) -> bytes:
    """One safetensors blob (deterministic: sorted keys), whose SHA-256 is the program's identity."""
    arrays = {GRAPH_PREFIX + k: np.frombuffer(v, dtype=np.uint8) for k, v in program.graphs.items()}
    arrays.update({STATE_PREFIX + k: np.asarray(v, order="C") for k, v in program.state.items()})
    meta = {"format": PROGRAM_FORMAT, "manifest": json.dumps(program.manifest, sort_keys=True)}
    return safetensors.numpy.save(dict(sorted(arrays.items())), metadata=meta)


def program_digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def unpack_program(blob: bytes, digest: str | None = None) -> EdgeProgram:
    """Parse and check a program blob; ``digest`` (hex SHA-256) is the one the runtime announced.

    Raises ProgramError naming what is wrong (size, digest, layout, manifest, or a graph's operator)."""
    if len(blob) > MAX_PROGRAM_BYTES:
        raise ProgramError(f"edge program of {len(blob)} bytes exceeds {MAX_PROGRAM_BYTES}")
    if digest is not None and program_digest(blob) != digest:
        raise ProgramError("edge program does not match the digest the runtime announced")
    try:
        meta = _safetensors_metadata(blob)
        arrays = safetensors.numpy.load(blob)
    except Exception as e:  # malformed header, bad offsets, unknown dtypes
        raise ProgramError(f"edge program is not a safetensors blob ({type(e).__name__}: {str(e)[:120]})") from None
    if (meta or {}).get("format") != PROGRAM_FORMAT:
        raise ProgramError(f"edge program format {(meta or {}).get('format')!r}, expected {PROGRAM_FORMAT!r}")
    try:
        manifest = json.loads(meta["manifest"])
    except (KeyError, ValueError):
        raise ProgramError("edge program has no readable manifest") from None
    graphs, state = {}, {}
    for key, value in arrays.items():
        if key.startswith(GRAPH_PREFIX) and value.dtype == np.uint8 and value.ndim == 1:
            graphs[key[len(GRAPH_PREFIX):]] = value.tobytes()
        elif key.startswith(STATE_PREFIX):
            state[key[len(STATE_PREFIX):]] = value
        else:
            raise ProgramError(f"edge program holds an unexpected tensor {key[:60]!r}")
    check_manifest(manifest, graphs, state)
    for name, graph in graphs.items():
        check_graph(graph, name)
    return EdgeProgram(manifest, graphs, state)


def _safetensors_metadata(blob: bytes) -> dict:
    """The ``__metadata__`` of a safetensors header (8-byte little-endian length + JSON)."""
    if len(blob) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(blob[:8], "little")
    if n > min(len(blob) - 8, 16 << 20):
        raise ValueError("header length out of range")
    header = json.loads(blob[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _names(spec, what: str) -> list[str]:
    if not isinstance(spec, list) or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in spec):
        raise ProgramError(f"edge program manifest: {what} must be a list of names")
    return spec


def check_manifest(manifest, graphs: dict[str, bytes], state: dict[str, np.ndarray]) -> None:
    """The manifest names every tensor the device feeds and reads, with shapes matching the state."""
    if not isinstance(manifest, dict):
        raise ProgramError("edge program manifest must be an object")
    for key in ("trainer", "optimizer", "params", "buffers", "graphs", "num_classes", "input_shape"):
        if key not in manifest:
            raise ProgramError(f"edge program manifest lacks {key!r}")
    _check_numbers(manifest)
    params, buffers = _names(manifest["params"], "params"), _names(manifest["buffers"], "buffers")
    if set(state) != set(params) | set(buffers):
        raise ProgramError("edge program's initial state does not hold exactly its params and buffers")
    if not isinstance(manifest["graphs"], dict) or set(manifest["graphs"]) != set(graphs):
        raise ProgramError("edge program manifest does not describe exactly its graphs")
    for name, spec in manifest["graphs"].items():
        if not isinstance(spec, dict):
            raise ProgramError(f"edge program graph {name!r}: spec must be an object")
        _names(spec.get("inputs"), f"graph {name} inputs")
        _names(spec.get("outputs"), f"graph {name} outputs")
        batch = spec.get("batch")
        if batch is not None and (type(batch) is not int or not 1 <= batch <= 65536):
            raise ProgramError(f"edge program graph {name!r}: batch must be null or an integer in [1, 65536]")
    for key in ("extract", "train_step"):
        if key not in graphs:
            raise ProgramError(f"edge program has no {key!r} graph")
    _check_graph_names(manifest, params, buffers)
    for arr_name, arr in state.items():
        if arr.dtype not in (np.float32, np.int64):
            raise ProgramError(f"edge program state {arr_name!r} has dtype {arr.dtype}")


def _check_graph_names(m: dict, params: list[str], buffers: list[str]) -> None:
    """Each graph reads and writes exactly the tensors a device feeds and uses (a program must not make a
    device look up a name it does not have halfway through a round)."""
    from edge_sdk.program.spec import ONNX_TRAINERS
    if m["trainer"] not in ONNX_TRAINERS:
        raise ProgramError(f"edge program trainer {str(m['trainer'])[:40]!r} is not one the onnxruntime engine runs")
    for key in ("trainable", "perturbed", "classifier"):
        if not set(m.get(key, [])) <= set(params):
            raise ProgramError(f"edge program manifest: {key} names tensors that are not parameters")
    state = [f"param.{n}" for n in params] + [f"buffer.{n}" for n in buffers]
    perturbed = m.get("perturbed", [])
    step, extract = m["graphs"]["train_step"], m["graphs"]["extract"]
    feeds = set(state) | {"images", "labels", "teacher", "teacher_mask", "valid"} | {f"tangent.{n}" for n in perturbed}
    if not set(step["inputs"]) <= feeds or not set(extract["inputs"]) <= set(state) | {"images"}:
        raise ProgramError("edge program graph inputs must be the state, the batch and the tangents")
    needed = {"loss", "ce", "kd", "logits"} | {f"buffer_out.{n}" for n in buffers}
    if m["trainer"] == "backprop":
        needed |= {f"grad.{n}" for n in m.get("trainable", params)}
    else:
        if not perturbed:
            raise ProgramError("edge program manifest: fg_weight perturbs no parameters")
        needed |= {"jvp"}
    if not needed <= set(step["outputs"]) or len(step["outputs"]) != len(set(step["outputs"])):
        raise ProgramError("edge program train_step outputs lack what a step needs (or repeat a name)")
    if extract["outputs"] != ["logits", "features"]:
        raise ProgramError("edge program extract outputs must be [logits, features]")


def _check_numbers(m: dict) -> None:
    """The manifest's numbers a device acts on: typed and in range (a program must not make a device train
    forever or allocate without bound)."""
    def integer(key, lo, hi, value=None):
        value = m.get(key) if value is None else value
        if type(value) is not int or not lo <= value <= hi:
            raise ProgramError(f"edge program manifest: {key} must be an integer in [{lo}, {hi}]")
    integer("num_classes", 2, 100_000)
    integer("batch_size", 1, 65_536)
    shape = m.get("input_shape")
    if not isinstance(shape, list) or len(shape) != 3:
        raise ProgramError("edge program manifest: input_shape must be [C, H, W]")
    for v in shape:
        integer("input_shape", 1, 4096, v)
    opt = m.get("optimizer")
    if not isinstance(opt, dict) or opt.get("name") not in ("sgd", "adam"):
        raise ProgramError("edge program manifest: optimizer must name sgd or adam")
    for key in ("lr", "momentum", "weight_decay", "eps"):
        value = opt.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e3:
            raise ProgramError(f"edge program manifest: optimizer.{key} must be a number in [0, 1000]")
    edge = m.get("edge")
    if not isinstance(edge, dict):
        raise ProgramError("edge program manifest: edge must be the recipe's edge section")
    integer("edge.epochs", 1, 1000, edge.get("epochs"))
    options = m.get("trainer_options", {})
    if not isinstance(options, dict) or ("tangents" in options and (type(options["tangents"]) is not int or
                                                                   not 1 <= options["tangents"] <= 1024)):
        raise ProgramError("edge program manifest: trainer_options.tangents must be an integer in [1, 1024]")
    for key in ("trainable", "perturbed", "classifier"):
        if key in m:
            _names(m[key], key)
    if not isinstance(m.get("trainer"), str) or not isinstance(edge.get("model"), str):
        raise ProgramError("edge program manifest: trainer and edge.model must be names")


# The operators the compiler emits for the trainers it supports (edge_sdk/program/compile.py): a graph with
# any other (control flow above all: a Loop can run for ever) is not one of ours.
ALLOWED_OPS = frozenset({
    "Abs", "Add", "And", "ArgMax", "Cast", "CastLike", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "ConvTranspose", "Div", "Equal", "Exp", "Expand", "Flatten", "Gather", "GatherElements", "Gemm", "Greater",
    "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "Log", "LogSoftmax", "MatMul", "Max", "MaxPool",
    "AveragePool", "GlobalAveragePool", "Min", "Mul", "Neg", "Not", "Or", "Pad", "Pow", "Range", "Reciprocal",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "ScatterElements", "ScatterND", "Shape", "Sigmoid",
    "Sign", "Size", "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tile", "Transpose", "Trilu",
    "Unsqueeze", "Where"})
MAX_NODES = 50_000


def check_graph(blob: bytes, name: str = "graph") -> None:
    """Admit only a self-contained graph of the operators the compiler emits (standard ONNX domain, no control
    flow, no local functions, no sparse or external-data tensors anywhere); raises ProgramError naming the
    offence."""
    import onnx  # the reference parser: a graph is checked with the library that defines the format

    if len(blob) > MAX_GRAPH_BYTES:
        raise ProgramError(f"graph {name!r} of {len(blob)} bytes exceeds {MAX_GRAPH_BYTES}")
    try:
        model = onnx.ModelProto.FromString(blob)
    except Exception as e:
        raise ProgramError(f"graph {name!r} is not an ONNX model ({type(e).__name__})") from None
    for opset in model.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise ProgramError(f"graph {name!r} imports operator domain {opset.domain!r}; only the standard "
                               "ONNX domain is accepted")
    if len(model.functions):
        raise ProgramError(f"graph {name!r} defines model-local functions; only standard operators are accepted")
    graph = model.graph
    if len(graph.node) > MAX_NODES:
        raise ProgramError(f"graph {name!r} has {len(graph.node)} nodes (at most {MAX_NODES})")
    if len(graph.sparse_initializer):
        raise ProgramError(f"graph {name!r} holds sparse tensors; an edge program has none")

    def dense(tensor, where: str) -> None:
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data):
            raise ProgramError(f"graph {name!r}: {where} refers to external data")

    for init in graph.initializer:
        dense(init, f"tensor {init.name[:60]!r}")
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise ProgramError(f"graph {name!r}: node {node.op_type!r} of domain {node.domain!r} is not a "
                               "standard ONNX operator")
        if node.op_type not in ALLOWED_OPS:
            raise ProgramError(f"graph {name!r}: operator {node.op_type[:40]!r} is not one an edge program uses")
        for attr in node.attribute:
            if attr.HasField("g") or len(attr.graphs):
                raise ProgramError(f"graph {name!r}: {node.op_type!r} carries a subgraph")
            if attr.HasField("sparse_tensor") or len(attr.sparse_tensors):
                raise ProgramError(f"graph {name!r}: {node.op_type!r} carries a sparse tensor")
            for tensor in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors):
                dense(tensor, f"an attribute of {node.op_type!r}")
