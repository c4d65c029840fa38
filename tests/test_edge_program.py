"""Edge programs: graphs compiled from torch and run by onnxruntime + numpy agree with the torch trainers.

One step per trainer from the same state and batch: loss, gradients or jvp, updated parameters and BN
statistics within 1e-5; extraction within 1e-5; an export without the batch-norm fix must disagree.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from edge_sdk.config import EdgeConfig
from edge_sdk.program.compile import build_model, compile_program, onnx_trainer_problem
from edge_sdk.program.format import (EdgeProgram, ProgramError, check_graph, pack_program, program_digest,
                                     unpack_program)
from edge_sdk.program.optim import NumpyOptimizer
from edge_sdk.program.runner import ProgramRunner
from edge_sdk.trainers import create_trainer
from edge_sdk.trainers.forward_grad import gaussian_like

SHAPE, CLASSES, BATCH = (1, 12, 12), 4, 16
TOL = 1e-5


def edge_config(trainer: str, optimizer: str = "sgd", **kwargs) -> EdgeConfig:
    return EdgeConfig(model="resnet8_gkt", trainer=trainer, optimizer=optimizer, lr=0.05, batch_size=BATCH,
                      kd_alpha=0.7, temperature=2.0, trainer_kwargs=kwargs)


@functools.lru_cache(maxsize=None)
def program_blob(trainer: str, optimizer: str, fix: bool = True, exact: bool = True) -> bytes:
    kwargs = {"exact_classifier": exact, "tangents": 2} if trainer == "fg_weight" else {}
    return pack_program(compile_program(edge_config(trainer, optimizer, **kwargs), CLASSES, SHAPE, seed=0,
                                        batch_norm_fix=fix))


def batches(n_steps=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    for size in [BATCH] * (n_steps - 1) + [BATCH - 5]:  # the last batch is short
        yield (torch.randn(size, *SHAPE, generator=g), torch.randint(0, CLASSES, (size,), generator=g),
               torch.randn(size, CLASSES, generator=g), torch.rand(size, generator=g) > 0.4)


def max_state_error(runner: ProgramRunner, model: torch.nn.Module) -> float:
    ours = runner.model_state()
    return max(float(np.abs(ours[k].astype(np.float64) - v.numpy()).max()) for k, v in model.state_dict().items())


def torch_gradients(model, images, labels, teacher, mask, cfg):
    from model_zoo.losses import gkt_loss
    model.train()
    logits, _ = model(images)
    loss, _, _ = gkt_loss(logits, labels, teacher, mask, cfg.kd_alpha, cfg.temperature)
    return dict(zip([n for n, _ in model.named_parameters()],
                    torch.autograd.grad(loss, list(model.parameters()))))


@pytest.mark.parametrize("optimizer", ["adam"])  # SGD: the numpy optimizer test; each compile costs ~25 s
def test_backprop_step_matches_torch(optimizer):
    blob = program_blob("backprop", optimizer)
    runner = ProgramRunner(unpack_program(blob, program_digest(blob)))
    cfg = edge_config("backprop", optimizer)
    model = build_model(cfg, CLASSES, SHAPE, 0)
    trainer = create_trainer("backprop", model, cfg)
    assert max_state_error(runner, model) == 0.0  # the program ships the model's initial state
    for images, labels, teacher, mask in batches():
        # gradients: the graph's own outputs against autograd, from the same state
        feed, _ = runner._batch_feed(images.numpy(), labels.numpy(), teacher.numpy(), mask.numpy().astype(np.float32))
        out = runner._run("train_step", {**feed, **runner._state_feed()})
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        grads = torch_gradients(model, images, labels, teacher, mask, cfg)
        model.load_state_dict(snapshot)  # that forward pass moved BN statistics: undo before the real step
        for name, g in grads.items():
            np.testing.assert_allclose(out[f"grad.{name}"], g.numpy(), atol=TOL, rtol=0, err_msg=name)
        result = trainer.train_step(images, labels, teacher, mask)
        ours = runner.train_step(images.numpy(), labels.numpy(), teacher.numpy(), mask.numpy().astype(np.float32))
        assert abs(ours.loss - result.loss) < TOL and abs(ours.ce - result.ce) < TOL and abs(ours.kd - result.kd) < TOL
        assert ours.correct == result.correct and ours.samples == result.samples == len(labels)
        assert max_state_error(runner, model) < TOL  # parameters after the optimizer step, and BN statistics


@pytest.mark.parametrize("exact", [True])
def test_fg_weight_step_matches_torch(exact):
    # SGD with momentum: its update is linear in the gradient, so 1e-5 holds step after step; Adam's m/sqrt(v)
    # turns last-bit differences of near-zero gradient entries into O(lr) steps (Adam's parity: the backprop
    # test from one state, and test_numpy_optimizer_matches_torch)
    blob = program_blob("fg_weight", "sgd", exact=exact)
    runner = ProgramRunner(unpack_program(blob))
    cfg = edge_config("fg_weight", "sgd", exact_classifier=exact, tangents=2)
    model = build_model(cfg, CLASSES, SHAPE, 0)
    trainer = create_trainer("fg_weight", model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    assert runner.step_batch == BATCH  # forward mode: a fixed batch, short batches padded
    for images, labels, teacher, mask in batches():
        state = trainer.generator.get_state()  # replay the torch trainer's tangents
        params = {key: p for sel, keys in zip(trainer.perturbed, trainer._keys) for n, p in sel.items()
                  for key in (keys[n],)}
        tangents = []
        for _ in range(2):
            v = gaussian_like(params, trainer.generator)
            tangents.append({names[id(params[k])]: v[k].numpy() for k in params})
        trainer.generator.set_state(state)
        # the directional derivative against torch's forward-mode pass on the same state
        from edge_sdk.trainers.forward_grad import directional_derivative
        keyed = [{n: torch.from_numpy(tangents[0][names[id(p)]]) for n, p in sel.items()} for sel in trainer.perturbed]
        snapshot = {k: v.clone() for k, v in model.state_dict().items()}
        model.train()
        _, _, _, _, d, _ = directional_derivative(trainer.chain, images, keyed, labels, teacher, mask, cfg)
        model.load_state_dict(snapshot)
        feed, _ = runner._batch_feed(images.numpy(), labels.numpy(), teacher.numpy(), mask.numpy().astype(np.float32))
        out = runner._run("train_step", {**feed, **runner._state_feed(),
                                         **{f"tangent.{n}": tangents[0][n] for n in runner.perturbed}})
        assert abs(float(out["jvp"]) - d) < TOL * max(1.0, abs(d))
        result = trainer.train_step(images, labels, teacher, mask)
        ours = runner.train_step(images.numpy(), labels.numpy(), teacher.numpy(), mask.numpy().astype(np.float32),
                                 tangents=tangents)
        assert abs(ours.loss - result.loss) < TOL and abs(ours.ce - result.ce) < TOL and abs(ours.kd - result.kd) < TOL
        assert ours.correct == result.correct
        ours_state, theirs = runner.model_state(), model.state_dict()
        worst = max(theirs, key=lambda k: float(np.abs(ours_state[k].astype(np.float64) - theirs[k].numpy()).max()))
        assert max_state_error(runner, model) < TOL, worst


@pytest.mark.parametrize("trainer", ["backprop", "fg_weight"])
def test_extraction_matches_torch(trainer):
    optimizer = "adam" if trainer == "backprop" else "sgd"  # the programs the step tests compiled
    runner = ProgramRunner(unpack_program(program_blob(trainer, optimizer)))
    model = build_model(edge_config(trainer, optimizer), CLASSES, SHAPE, 0).eval()
    images = torch.randn(37, *SHAPE)
    with torch.no_grad():
        logits, features = model(images)
    ours_logits, ours_features = runner.extract(images.numpy())
    np.testing.assert_allclose(ours_logits, logits.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(ours_features, features.numpy(), atol=TOL, rtol=0)


def test_export_without_the_batch_norm_fix_is_wrong():
    """torchlib lowers train-mode batch norm as inference: without our batch norm the step graph silently
    computes other numbers. This is the guard that the fix is what makes parity hold."""
    cfg = edge_config("backprop", "sgd")
    program = compile_program(cfg, CLASSES, SHAPE, seed=0, batch_norm_fix=False)
    with pytest.raises(ProgramError, match="BatchNormalization"):  # and devices would refuse it
        unpack_program(pack_program(program))
    broken = ProgramRunner(program)
    model = build_model(cfg, CLASSES, SHAPE, 0)
    trainer = create_trainer("backprop", model, cfg)
    images, labels, teacher, mask = next(batches())
    result = trainer.train_step(images, labels, teacher, mask)
    ours = broken.train_step(images.numpy(), labels.numpy(), teacher.numpy(), mask.numpy().astype(np.float32))
    assert abs(ours.loss - result.loss) > 1e-3 or max_state_error(broken, model) > 1e-3


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_numpy_optimizer_matches_torch(optimizer):
    rng = np.random.default_rng(0)
    shapes = {"a": (3, 4), "b": (5,)}
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    settings = {"name": optimizer, "lr": 0.03, "momentum": 0.9, "weight_decay": 1e-3}
    ours = NumpyOptimizer(settings)
    ref = {n: torch.nn.Parameter(torch.from_numpy(p.copy())) for n, p in params.items()}
    opt = (torch.optim.SGD(ref.values(), lr=0.03, momentum=0.9, weight_decay=1e-3) if optimizer == "sgd" else
           torch.optim.Adam(ref.values(), lr=0.03, weight_decay=1e-3))
    for _ in range(5):
        grads = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
        for n, p in ref.items():
            p.grad = torch.from_numpy(grads[n].copy())
        opt.step()
        ours.step(params, grads)
        for n in shapes:
            np.testing.assert_allclose(params[n], ref[n].detach().numpy(), atol=1e-6)
    again = NumpyOptimizer(settings)  # its state round-trips through the portable arrays
    again.load_state_arrays(ours.state_arrays(), shapes)
    assert again.state_arrays().keys() == ours.state_arrays().keys()
    with pytest.raises(ValueError, match="not"):
        again.load_state_arrays({"zz.momentum_buffer": np.zeros(1, np.float32)}, shapes)


def test_program_blob_is_checked():
    blob = program_blob("backprop", "sgd")
    with pytest.raises(ProgramError, match="digest"):
        unpack_program(blob, "0" * 64)
    with pytest.raises(ProgramError, match="safetensors"):
        unpack_program(b"\x00" * 64)
    program = unpack_program(blob)
    import onnx
    model = onnx.ModelProto.FromString(program.graphs["extract"])
    node = model.graph.node[0]
    node.domain = "com.microsoft"
    with pytest.raises(ProgramError, match="com.microsoft"):
        check_graph(model.SerializeToString())
    model = onnx.ModelProto.FromString(program.graphs["extract"])
    model.opset_import.add(domain="evil.ops", version=1)
    with pytest.raises(ProgramError, match="evil.ops"):
        check_graph(model.SerializeToString())
    model = onnx.ModelProto.FromString(program.graphs["extract"])
    tensor = model.graph.initializer.add()
    tensor.name, tensor.data_type, tensor.data_location = "w", onnx.TensorProto.FLOAT, onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    with pytest.raises(ProgramError, match="external data"):
        check_graph(model.SerializeToString())
    tampered = EdgeProgram({**program.manifest, "params": program.manifest["params"][1:]}, program.graphs, program.state)
    with pytest.raises(ProgramError, match="params and buffers"):
        unpack_program(pack_program(tampered))


def test_trainers_without_a_graph_say_why():
    assert onnx_trainer_problem("backprop") is None and onnx_trainer_problem("fg_weight") is None
    for name in ("forward", "fg_local_guess", "async_fgd"):
        assert onnx_trainer_problem(name)
    with pytest.raises(ValueError, match="async_fgd"):
        compile_program(edge_config("async_fgd"), CLASSES, SHAPE)


# -- engines: a device switches engines without losing its state ---------------------------------------------


def _dataset(tmp_path, n=48):
    from conftest import make_npz_dataset
    from edgefl_core.data.datasets import load_npz
    return load_npz(make_npz_dataset(tmp_path / "d", n_train=n, n_test=8) / "train.npz", "train")


def test_a_device_switches_engines_without_losing_model_optimizer_or_soft_labels(tmp_path):
    from edge_sdk.engines.onnx_engine import OnnxEngine
    from edge_sdk.engines.torch_engine import TorchEngine
    from edge_sdk.state import read_state, write_state
    train = _dataset(tmp_path)
    cfg = edge_config("backprop", "adam")
    program = unpack_program(program_blob("backprop", "adam"))
    pt = TorchEngine("d0", cfg, train, None, stats_name=None, seed=7, threads=1, init_seed=0)
    initial = pt.model_state()  # a run's devices start from the run seed's model, whichever their engine
    assert all(np.array_equal(initial[k], program.state[k]) for k in program.state)
    pt.train_round(0)
    pt.receive_soft_labels(train.sample_ids[:10].copy(), np.ones((10, CLASSES), np.float32), 0)
    write_state(tmp_path / "s.safetensors", meta={"round": 0}, model=pt.model_state(), optimizer=pt.optimizer_state(),
                soft_logits=pt.soft_labels.logits, soft_present=pt.soft_labels.present)
    saved = read_state(tmp_path / "s.safetensors")
    ort = OnnxEngine("d0", program, train, None, stats_name=None, seed=0, threads=1)
    ort.load_model_state(saved["model"])
    ort.load_optimizer_state(saved["optimizer"])
    ort.soft_labels.load(saved["soft_logits"], saved["soft_present"], 0)
    assert len(ort.soft_labels) == 10
    images, labels, teacher, mask = next(batches(seed=5))
    pt.client.trainer.train_step(images, labels, teacher, mask)   # one more step on each, from the same state
    ort.runner.train_step(images.numpy(), labels.numpy(), teacher.numpy(), mask.numpy().astype(np.float32))
    ours, theirs = ort.model_state(), pt.model_state()
    # Adam's moments carried over: a lost state would move weights by ~lr (0.05); the state after a round of
    # torch steps (channels-last kernels) differs from a graph's in the last bits, which Adam's m/sqrt(v) grows
    assert max(float(np.abs(ours[k] - theirs[k]).max()) for k in theirs) < 1e-4
    back = TorchEngine("d0", cfg, train, None, stats_name=None, seed=1, threads=1)  # and back to torch
    back.load_model_state(ort.model_state())
    back.load_optimizer_state(ort.optimizer_state())
    assert back.optimizer_state().keys() == ort.optimizer_state().keys()


# -- the agent accepts a program only against an announced digest, and only standard graphs --------------------


def _ort_agent(tmp_path, engine="onnxruntime"):
    from conftest import make_npz_dataset
    from edge_sdk.agent import build_agent
    from edge_sdk.config import AgentConfig
    from edgefl_core.data.config import AgentDataConfig
    from edgefl_core.transport import MemoryBus
    data = make_npz_dataset(tmp_path / "dev", n_train=64, n_test=16)
    cfg = AgentConfig(device_id="devA", run_id="r", engine=engine, data=AgentDataConfig("npz", str(data)),
                      state_dir=str(tmp_path / "state"))
    return build_agent(cfg, transport=MemoryBus().client("devA"))


def _hello(agent, digests):
    import dataclasses
    from edge_sdk import protocol as P
    from edge_sdk.config import RunRecipe
    recipe = dataclasses.asdict(RunRecipe(edge=edge_config("backprop", "adam")))
    agent.handle(P.Topics("r").control, P.control_frame(P.HELLO, run="r", device="*", round_=0, session="s1",
                                                        recipe=recipe, edge_programs=digests))


def _send_program(agent, blob):
    from edge_sdk import protocol as P
    for frame in P.chunk_transfer(blob, run="r", device="devA", round_=0, meta={"kind": P.KIND_EDGE_PROGRAM}):
        agent.handle(P.Topics("r").down("devA"), frame)


def test_an_agent_runs_a_program_only_once_its_digest_is_announced(tmp_path):
    agent = _ort_agent(tmp_path)
    blob = program_blob("backprop", "adam")
    _hello(agent, [])
    assert agent.recipe is not None and agent.client is None  # registered, waiting for the program
    _send_program(agent, blob)
    assert agent.client is None  # not announced (yet): held, not run
    _hello(agent, ["f" * 64, program_digest(blob)])
    assert agent.client is not None and agent.client.name == "onnxruntime" and agent.rejected == 0
    assert (tmp_path / "state" / "programs" / f"{program_digest(blob)}.edgeprog").exists()
    agent.save_state()
    again = _ort_agent(tmp_path)  # a restart: the cached program is used at once, and the state resumed
    _hello(again, [program_digest(blob)])
    assert again.client is not None and again.internal_errors == 0


def test_an_announced_program_with_a_custom_operator_is_refused(tmp_path):
    import onnx
    program = unpack_program(program_blob("backprop", "adam"))
    model = onnx.ModelProto.FromString(program.graphs["train_step"])
    model.graph.node[0].domain = "com.microsoft"  # e.g. a contrib op a compromised build slipped in
    evil = pack_program(EdgeProgram(program.manifest, {**program.graphs, "train_step": model.SerializeToString()},
                                    program.state))
    agent = _ort_agent(tmp_path)
    _hello(agent, [program_digest(evil)])
    _send_program(agent, evil)
    assert agent.client is None and agent.rejected == 1 and agent.internal_errors == 0 and not agent.stop.is_set()
    torch_agent = _ort_agent(tmp_path / "t", engine="torch")  # a torch device never takes a program
    _hello(torch_agent, [program_digest(evil)])
    _send_program(torch_agent, program_blob("backprop", "adam"))
    assert torch_agent.rejected == 1 and torch_agent.client.name == "torch"


# -- fuzzing: whatever program the runtime's downlink carries, the agent never crashes ---------------------------


def _mutations():
    from hypothesis import strategies as st
    json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() |
                               st.text(max_size=20), lambda inner: st.lists(inner, max_size=4) |
                               st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
    keys = st.sampled_from(["trainer", "optimizer", "params", "buffers", "graphs", "num_classes", "input_shape",
                            "batch_size", "edge", "trainable", "perturbed", "trainer_options", "feature_shape",
                            "classifier"])
    return st.one_of(
        st.tuples(st.just("manifest"), keys, json_values),
        st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 10**9), st.none()),
        st.tuples(st.just("drop_graph"), st.sampled_from(["extract", "train_step"]), st.none()))


def test_fuzzed_programs_never_crash_an_agent(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    program = unpack_program(program_blob("backprop", "adam"))
    blob = program_blob("backprop", "adam")

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_mutations())
    def run(mutation):
        kind, a, b = mutation
        if kind == "manifest":
            evil = pack_program(EdgeProgram({**program.manifest, a: b}, program.graphs, program.state))
        elif kind == "flip":
            raw = bytearray(blob)
            raw[a % len(raw)] ^= b
            evil = bytes(raw)
        elif kind == "truncate":
            evil = blob[:a % len(blob)]
        else:
            evil = pack_program(EdgeProgram(program.manifest, {k: v for k, v in program.graphs.items() if k != a},
                                            program.state))
        agent = _ort_agent(tmp_path_factory.mktemp("fuzz"))
        _hello(agent, [program_digest(evil)])
        _send_program(agent, evil)
        assert agent.internal_errors == 0 and not agent.stop.is_set()
        if agent.client is not None:  # only a program that passed every check runs
            unpack_program(evil, program_digest(evil))
    run()


def test_both_engines_draw_the_same_batches_and_augmentations():
    """Same seed, same data order and the same crops and flips in the torch and numpy data paths: the
    engines' runs differ only in floating-point rounding."""
    from edge_sdk.data.batching import ArrayLoader
    from edge_sdk.data.np_loader import NumpyLoader
    from edge_sdk.data.transforms import Augment
    from edgefl_core.data.datasets import ImageDataset
    rng = np.random.default_rng(0)
    ds = ImageDataset(rng.integers(0, 255, (50, 1, 8, 8), dtype=np.uint8), rng.integers(0, 3, 50),
                      np.arange(50) + 100, 3, "toy")
    ours = NumpyLoader(ds, 16, shuffle=True, crop_padding=2, hflip=True, seed=4)
    theirs = ArrayLoader(ds, 16, shuffle=True, augment=Augment(2, True), seed=4, channels_last=False)
    for _ in range(2):  # two epochs
        for a, b in zip(theirs, ours):
            assert np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.labels.numpy(), b.labels)
            np.testing.assert_allclose(a.images.numpy(), b.images, atol=1e-6)


# -- what the security review found (each test fails without its fix) ------------------------------------------


def test_graphs_with_control_flow_sparse_or_external_attribute_tensors_are_refused():
    import onnx
    from onnx import helper
    program = unpack_program(program_blob("backprop", "adam"))
    base = onnx.ModelProto.FromString(program.graphs["extract"])

    def with_node(node):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        model.graph.node.append(node)
        return model.SerializeToString()

    body = helper.make_graph([], "body", [], [])
    with pytest.raises(ProgramError, match="Loop"):
        check_graph(with_node(helper.make_node("Loop", ["", ""], ["o"], body=body)))
    sparse = onnx.SparseTensorProto()
    sparse.dims.extend([4])
    sparse.values.name, sparse.values.data_type = "v", onnx.TensorProto.FLOAT
    sparse.values.data_location = onnx.TensorProto.EXTERNAL
    entry = sparse.values.external_data.add()
    entry.key, entry.value = "location", "pi-02/agent.yaml"  # a file beside the agent (docs/DEPLOYMENT.md layout)
    with pytest.raises(ProgramError, match="sparse"):
        check_graph(with_node(helper.make_node("Constant", [], ["leak"], sparse_value=sparse)))
    dense = helper.make_tensor("t", onnx.TensorProto.FLOAT, [1], [0.0])
    dense.data_location = onnx.TensorProto.EXTERNAL
    attr = helper.make_attribute("value", dense)
    node = helper.make_node("Constant", [], ["leak2"])
    node.attribute.append(attr)
    with pytest.raises(ProgramError, match="external data"):
        check_graph(with_node(node))


def test_a_manifest_whose_trainer_or_outputs_do_not_fit_is_refused():
    program = unpack_program(program_blob("backprop", "adam"))
    for change in ({"trainer": "whatever"}, {"trainable": ["not.a.param"]},
                   {"graphs": {**program.manifest["graphs"], "extract": {**program.manifest["graphs"]["extract"],
                                                                           "outputs": ["features", "logits"]}}}):
        with pytest.raises(ProgramError):
            unpack_program(pack_program(EdgeProgram({**program.manifest, **change}, program.graphs, program.state)))


def test_repeated_registrations_do_not_make_the_runtime_resend_its_program(tmp_path):
    """200 registrations of one device process: one program transfer (was 200: ~3000x amplification)."""
    from cloud_runtime.config import load_runtime_config
    from cloud_runtime.edge_programs import PROGRAMS_PER_WINDOW
    from cloud_runtime.program_build import cached_program_path, run_program_spec
    from cloud_runtime.service import CloudRuntime
    from edge_sdk import protocol as P
    from edgefl_core.transport import MemoryBus
    cfg = load_runtime_config(None, ["run_id=r", f"state_dir={tmp_path / 'rt'}", "num_classes=4",
                                     "input_shape=[1,12,12]", "edge.batch_size=16", "edge.optimizer=adam",
                                     "edge.lr=0.05", "edge.kd_alpha=0.7", "edge.temperature=2.0"])
    path = cached_program_path(cfg.state_dir, run_program_spec(cfg))
    path.parent.mkdir(parents=True)
    path.write_bytes(program_blob("backprop", "adam"))  # as `cloud-runtime program build` leaves it
    bus = MemoryBus()
    runtime = CloudRuntime(cfg, bus.client("runtime"))
    assert runtime.downlink.recipe["edge_programs"] == [program_digest(program_blob("backprop", "adam"))]
    frames = []
    bus.client("sniff").subscribe(P.Topics("r").down("mal"), lambda t, p: frames.append(p))
    register = P.control_frame(P.REGISTER, run="r", device="mal", round_=-1, session=runtime.session, num_classes=4,
                               train_samples=100, input_shape=[1, 12, 12], engine="onnxruntime", program=None,
                               pid=4242)
    for _ in range(200):
        runtime.handle(P.Topics("r").up("mal"), register)
    chunks = [f for f in frames if P.decode_frame(f)[0]["type"] == P.CHUNK]
    assert 0 < len(chunks) <= 8  # one transfer of a ~0.7 MB program (256 KiB chunks)
    assert runtime.registry.rejections.get("internal_error", 0) == 0
    # the pid is the device's claim: a new one in each of 200 registrations got the program 200 times (156 MB)
    frames.clear()
    for pid in range(200):
        runtime.handle(P.Topics("r").up("mal"), P.control_frame(
            P.REGISTER, run="r", device="mal", round_=-1, session=runtime.session, num_classes=4, train_samples=100,
            input_shape=[1, 12, 12], engine="onnxruntime", program=None, pid=10_000 + pid))
    sent = {P.decode_frame(f)[0]["transfer"] for f in frames if P.decode_frame(f)[0]["type"] == P.CHUNK}
    assert len(sent) == PROGRAMS_PER_WINDOW - 1  # the burst a device's restarts may use, then nothing for a while


def test_a_program_that_breaks_a_round_is_refused_and_the_agent_keeps_serving(tmp_path):
    import threading
    from edge_sdk import protocol as P
    agent = _ort_agent(tmp_path)
    blob = program_blob("backprop", "adam")
    _hello(agent, [program_digest(blob)])
    _send_program(agent, blob)
    assert agent.client is not None

    def broken(*a, **k):
        raise RuntimeError("an onnxruntime kernel failed")
    agent.client.runner.train_step = broken
    agent.handle(P.Topics("r").control, P.control_frame(P.ROUND, run="r", device="*", round_=0, session="s1"))
    serving = threading.Thread(target=agent.serve, daemon=True)
    serving.start()
    deadline = __import__("time").monotonic() + 30
    while agent.client is not None and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    agent.stop.set()
    serving.join(10)
    assert agent.client is None and program_digest(blob) in agent.programs.refused and agent.exit_code == 0
    assert not (tmp_path / "state" / "programs" / f"{program_digest(blob)}.edgeprog").exists()
    _hello(agent, [program_digest(blob)])  # announced again: not run again
    assert agent.client is None


def test_a_state_with_a_negative_step_or_nan_weights_is_not_resumed():
    from edge_sdk.state import state_problem
    model = {"w": np.zeros(3, np.float32)}
    good = {"device": "d", "run": "r", "recipe": "x", "soft_logits": np.zeros((2, 2), np.float32), "model": model,
            "soft_present": np.zeros(2, bool), "soft_round": -1, "last_done": 0, "trained_round": 0,
            "done_session": "", "optimizer": {"w.step": np.array(3.0, np.float32)}}
    kwargs = dict(device="d", run="r", recipe="x", model={"w": (3,)}, soft_shape=(2, 2))
    assert state_problem(good, **kwargs) is None
    assert "step count" in state_problem({**good, "optimizer": {"w.step": np.array(-1.0, np.float32)}}, **kwargs)
    assert "NaN" in state_problem({**good, "model": {"w": np.full(3, np.nan, np.float32)}}, **kwargs)
