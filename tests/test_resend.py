"""Uploads the runtime already holds are not sent again, and the report counts bytes by what became of them
(issue 14, item 6): ``bytes_up`` is the wire bytes of accepted transfers (each chunk's first copy, counted
once, at acceptance); re-sent and rejected bytes are reported beside it, never as upload.

MQTT QoS 1 is at-least-once: a broker may deliver a message twice (a redelivery after a reconnect), so the
run-level tests play such a broker: every uplink chunk of round 0 arrives twice, and the round-0
announcement arrives again while the devices upload round 1."""
import hashlib
import json
import logging
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from cloud_runtime.config import load_config, load_runtime_config
from cloud_runtime.service import CloudRuntime, build_runtime
from conftest import wait_until
from edge_sdk import protocol as P
from edge_sdk.agent import build_agent
from edge_sdk.messages import FeatureUpload
from edgefl_core.transport import MemoryBus

RUN = "r"


# -- the runtime's byte accounting ----------------------------------------------------------------------------


def make_runtime(tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "server.batch_size=8",
                                     "transfer_timeout_s=60"])
    runtime = CloudRuntime(cfg, MemoryBus().client("runtime"))
    for device in ("devA", "devB"):
        runtime.register(device, {"num_classes": 4, "feature_channels": 16, "train_samples": 8})
    return runtime


def frames_of(device="devA", round_=0, seed=1, max_chunk=700):
    g = torch.Generator().manual_seed(seed)
    upload = FeatureUpload(device, round_, "train", np.arange(8, dtype=np.int64), torch.rand(8, 16, 4, 4, generator=g),
                           torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, "fp16")
    frames = P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=device, round_=round_, meta=meta,
                              max_chunk=max_chunk)
    assert len(frames) >= 3
    return frames, meta


def wire(frames):
    return sum(map(len, frames))


def send(runtime, device, frames):
    for frame in frames:
        runtime.handle(runtime.topics.up(device), frame)


def test_duplicate_chunks_and_whole_copies_are_resent_bytes_not_upload(tmp_path):
    runtime = make_runtime(tmp_path)
    frames, meta = frames_of()
    send(runtime, "devA", frames[:2] + frames[:1] + frames[2:])  # chunk 0 arrives twice (a QoS 1 redelivery)
    assert "devA" in runtime.strategy.train_uploads
    send(runtime, "devA", frames[1:])                            # late copies of a transfer already judged
    again, _ = frames_of()                                       # the same upload as a new transfer (a re-send)
    send(runtime, "devA", again)
    device = runtime.registry.devices["devA"]
    assert device["bytes_up"] == wire(frames)
    assert device["bytes_resent"] == len(frames[0]) + wire(frames[1:]) + wire(again)
    assert device["bytes_rejected"] == 0 and not runtime.registry.rejections
    assert device["raw_fp32_bytes"] == meta["raw_fp32_bytes"]    # credited once
    row = {"round": 0, "participants": ["devA"]}
    runtime.strategy.finish_row(row, 0.0)
    assert row["bytes_up"] == {"devA": wire(frames)} and row["bytes_rejected"] == {}
    assert row["bytes_resent"] == {"devA": device["bytes_resent"]}
    assert row["upload_compression_ratio"] == pytest.approx(meta["raw_fp32_bytes"] / wire(frames))
    final = runtime.report()["final"]
    assert (final["bytes_up"], final["bytes_resent"], final["bytes_rejected"]) == \
        (wire(frames), device["bytes_resent"], 0)
    assert final["upload_compression_ratio"] == pytest.approx(meta["raw_fp32_bytes"] / wire(frames))


def test_rejected_and_abandoned_transfers_are_rejected_bytes_not_upload(tmp_path):
    runtime = make_runtime(tmp_path)
    stale, _ = frames_of("devB", round_=-1, seed=2)      # the runtime is at round 0: stale_round
    send(runtime, "devB", stale)
    header, body = P.decode_frame(frames_of("devB", seed=3)[0][0])
    header["crc32"] ^= 1                                  # a chunk failing its crc32: refused on its own
    bad = P.encode_frame({k: v for k, v in header.items() if k != "v"}, body)
    send(runtime, "devB", [bad])
    partial = frames_of("devB", seed=4)[0][:2]           # a transfer its sender gave up on
    send(runtime, "devB", partial)
    assert runtime.ingest.expired() == []
    assert len(runtime.ingest.expired(now=1e12)) == 1     # what the runtime's pump does after transfer_timeout_s
    frames, _ = frames_of("devB", seed=5)                 # then an accepted one
    send(runtime, "devB", frames)
    partial_b = frames_of("devB", seed=6)[0][:1]          # open when the device re-registers: its sender is gone
    send(runtime, "devB", partial_b)
    runtime.register("devB", {"num_classes": 4, "feature_channels": 16, "train_samples": 8})
    device = runtime.registry.devices["devB"]
    assert runtime.registry.rejections["stale_round"] == 1 and runtime.registry.rejections["bad_checksum"] == 1
    assert device["bytes_up"] == wire(frames) and device["bytes_resent"] == 0
    assert device["bytes_rejected"] == wire(stale) + len(bad) + wire(partial) + wire(partial_b)
    row = {"round": 0, "participants": ["devB"]}
    runtime.strategy.finish_row(row, 0.0)
    assert row["bytes_up"] == {"devB": wire(frames)} and row["bytes_rejected"] == {"devB": device["bytes_rejected"]}
    final = runtime.report()["final"]
    assert final["bytes_up"] == wire(frames) and final["bytes_rejected"] == device["bytes_rejected"]


def test_chunks_of_a_quarantined_device_are_rejected_bytes(tmp_path):
    runtime = make_runtime(tmp_path)
    runtime.registry.devices["devA"]["quarantined_until"] = 1e12
    frames, _ = frames_of()
    send(runtime, "devA", frames)
    device = runtime.registry.devices["devA"]
    assert device["bytes_up"] == 0 and device["bytes_rejected"] == wire(frames)


def test_async_runtime_re_announces_a_round_to_a_re_registering_device_only_if_it_lacks_its_upload(tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "mode=async"])
    bus = MemoryBus()
    runtime = CloudRuntime(cfg, bus.client("runtime"))
    announced = []
    bus.client("devA").subscribe(runtime.topics.down("devA"), lambda t, p: announced.append(P.decode_frame(p)[0]))
    registration = {"num_classes": 4, "feature_channels": 16, "train_samples": 8}
    runtime.register("devA", registration)
    runtime.strategy.device_round["devA"] = 1
    runtime.strategy.train_uploads["devA"] = FeatureUpload("devA", 1, "train", np.arange(8), torch.zeros(8, 16, 4, 4),
                                                           torch.zeros(8, 4), torch.zeros(8, dtype=torch.int64))
    runtime.register("devA", registration)   # a restarted agent: its upload of round 1 is here already
    assert announced == []
    runtime.strategy.train_uploads["devA"].round = 0
    runtime.register("devA", registration)   # the runtime lacks round 1's upload: announced again
    assert [(h["type"], h["round"]) for h in announced] == [(P.ROUND, 1)]


# -- the agent: what the runtime accepted is never sent again ------------------------------------------------


def npz_overrides(npz_dir, devices=1, rounds=3):
    return ["data.dataset=npz", f"data.path={npz_dir}", "data.train_subset=null", f"run.devices={devices}",
            f"run.rounds={rounds}", "edge.model_kwargs={}", "server.lr=0.003", "deployment.round_deadline_s=60"]


class Sniffer:
    """Every uplink chunk of the run, as ``(round, split, transfer, index)`` per frame."""

    def __init__(self, bus, run):
        self.chunks = []
        bus.client("sniffer").subscribe(P.Topics(run).all_up, self.on_up)

    def on_up(self, topic, payload):
        header, _ = P.decode_frame(payload)
        if header["type"] == P.CHUNK:
            self.chunks.append((header["round"], (header.get("meta") or {}).get("split"), header["transfer"],
                                header["index"]))

    def transfers(self):
        return sorted({(r, s) for r, s, _, i in self.chunks if i == 0})


@pytest.fixture
def deployed(npz_dir, tmp_path):
    """A runtime and one agent on an in-memory bus, registered; the runtime answers from a thread."""
    from edgefl_cli.simulation import write_deployment
    name = f"resend-{tmp_path.name}"
    cfg = load_config("configs/quickstart.yaml", npz_overrides(npz_dir))
    deployment = write_deployment(cfg, tmp_path, f"memory://{name}")
    bus = MemoryBus.named(name)
    sniffer = Sniffer(bus, deployment.runtime.run_id)
    runtime = build_runtime(deployment.runtime)
    agent = build_agent(deployment.agents[0])
    runtime.start()
    agent.start()
    wait_until(lambda: len(runtime.registry.devices) == 1, step=lambda: [runtime.pump(0.01), agent.pump(0.01)])
    serving = threading.Event()
    server = threading.Thread(target=lambda: [runtime.pump(0.01) for _ in iter(serving.is_set, True)])
    server.start()
    yield runtime, agent, sniffer, deployment
    serving.set()
    server.join()
    agent.shutdown()
    runtime.close()


def announce(runtime, round_):
    """What the runtime broadcasts when it opens ``round_`` (eval on, no soft labels to wait for)."""
    runtime.strategy.next_round = round_
    runtime.ingest.new_round()
    runtime.strategy.train_uploads.clear()
    runtime.strategy.test_uploads.clear()
    return P.control_frame(P.ROUND, run=runtime.cfg.run_id, device="*", round_=round_,
                           **runtime.downlink._with_recipe(P.ROUND, runtime.strategy.round_frame(round_, True, [])))


def follow(agent, runtime, frame):
    """The agent receives ``frame`` (as its network thread would) and does what its main loop does with it."""
    agent.handle(runtime.topics.control, frame)
    if agent.pending_round is not None:
        header, agent.pending_round = agent.pending_round, None
        agent.run_round(header)


def test_announcements_repeated_or_redelivered_are_not_uploads(deployed, caplog):
    runtime, agent, sniffer, _ = deployed
    caplog.set_level(logging.INFO, logger="edgefl.agent")
    round0 = announce(runtime, 0)
    follow(agent, runtime, round0)
    assert sniffer.transfers() == [(0, "test"), (0, "train")] and agent.progress.last_done == 0
    follow(agent, runtime, round0)              # the same announcement again (a retained copy on reconnect)
    round1 = announce(runtime, 1)
    agent.handle(runtime.topics.control, round1)
    agent.handle(runtime.topics.control, round0)  # redelivered after the newer one: it must not displace it
    assert agent.pending_round["round"] == 1
    follow(agent, runtime, round1)
    assert agent.progress.last_done == 1
    follow(agent, runtime, round0)              # redelivered once round 1 is done: nothing to send
    assert sniffer.transfers() == [(0, "test"), (0, "train"), (1, "test"), (1, "train")]
    assert len(sniffer.chunks) == len(set(sniffer.chunks))  # (no chunk sent twice either)
    assert "re-sending" not in caplog.text and not runtime.registry.rejections
    assert "ignoring an announcement of round 0" in caplog.text


def test_a_restart_between_splits_resends_only_what_the_runtime_lacks(deployed, caplog):
    runtime, agent, sniffer, deployment = deployed
    caplog.set_level(logging.INFO, logger="edgefl.agent")
    round0 = announce(runtime, 0)
    original = agent.rounds.send_upload

    def dies_before_train(upload, codec, extractor, session):
        if upload.split == "train":
            return False  # killed before the train features were sent
        return original(upload, codec, extractor, session)
    agent.rounds.send_upload = dies_before_train
    follow(agent, runtime, round0)
    assert sniffer.transfers() == [(0, "test")] and "dev0" not in runtime.strategy.train_uploads
    assert agent.progress.trained_round == 0 and agent.progress.last_done == -1
    agent.shutdown()
    restarted = build_agent(deployment.agents[0])  # same state directory
    restarted.start()
    follow(restarted, runtime, round0)
    try:
        assert "re-sending round 0 without retraining" in caplog.text  # train was never accepted: needed
        assert sniffer.transfers() == [(0, "test"), (0, "train")]      # ... but test is not sent again
        assert restarted.progress.last_done == 0 and "dev0" in runtime.strategy.train_uploads
        assert runtime.registry.devices["dev0"]["bytes_resent"] == 0 and not runtime.registry.rejections
    finally:
        restarted.stop.set()


# -- whole runs over an at-least-once broker -----------------------------------------------------------------


class AtLeastOnce:
    """Subscribes like any client and plays a broker that delivers some messages twice: every uplink chunk of
    round 0 is published again, and the round-0 announcement is published again (not retained) once the first
    chunk of round 1 goes up. Counts each chunk's first copy per (device, round) and later copies per device."""

    def __init__(self, transport, run: str, duplicate: bool = True):
        self.transport, self.topics, self.duplicate = transport, P.Topics(run), duplicate
        self.first: Counter = Counter()       # (device, round) -> wire bytes of each chunk's first copy
        self.copies: Counter = Counter()      # device -> wire bytes of further copies (ours and the agents' own)
        self.republished: Counter = Counter()  # device -> wire bytes this broker delivered twice
        self._seen: set = set()
        self._sent: set = set()
        self._round0: bytes | None = None
        self.replayed = False
        self._lock = threading.Lock()
        transport.subscribe(self.topics.all_up, self.on_up, retained=False)
        transport.subscribe(self.topics.control, self.on_control)

    def on_up(self, topic, payload):
        header, _ = P.decode_frame(payload)
        if header["type"] != P.CHUNK:
            return
        device, digest = header["device"], hashlib.sha256(payload).digest()
        replay = None
        with self._lock:
            key = (device, header["transfer"], header["index"])
            if key in self._seen:
                self.copies[device] += len(payload)
            else:
                self._seen.add(key)
                self.first[(device, header["round"])] += len(payload)
            again = self.duplicate and header["round"] == 0 and digest not in self._sent
            if again:
                self._sent.add(digest)
                self.republished[device] += len(payload)
            if self.duplicate and header["round"] == 1 and not self.replayed and self._round0 is not None:
                self.replayed, replay = True, self._round0
        if again:
            self.transport.publish(topic, payload)
        if replay is not None:
            self.transport.publish(self.topics.control, replay)

    def on_control(self, topic, payload):
        if payload:
            header, _ = P.decode_frame(payload)
            if header["type"] == P.ROUND and header["round"] == 0 and self._round0 is None:
                self._round0 = payload


def check_run(report, tap, agent_logs: str):
    """No upload sent again, nothing stale; bytes_up is exactly the first copies of what was accepted."""
    assert "re-sending" not in agent_logs
    final = report["final"]
    assert not final["rejections"] and final["bytes_rejected"] == 0
    assert final["accepted_samples"] == len(report["rounds"]) * 400
    for row in report["rounds"]:
        expected = {d: b for (d, r), b in tap.first.items() if r == row["round"]}
        assert row["bytes_up"] == expected, (row["round"], row["bytes_up"], expected)
        assert row["bytes_rejected"] == {} and row["upload_compression_ratio"] > 1
    raw = sum(d["raw_fp32_bytes"] for d in report["devices"].values())
    assert final["bytes_up"] == sum(tap.first.values())
    assert final["upload_compression_ratio"] == pytest.approx(raw / final["bytes_up"])
    for name, device in report["devices"].items():
        assert device["bytes_up"] == sum(b for (d, _), b in tap.first.items() if d == name)
        assert tap.republished[name] <= device["bytes_resent"] <= tap.copies[name]
    assert final["bytes_resent"] == sum(d["bytes_resent"] for d in report["devices"].values())
    if tap.duplicate:
        assert tap.replayed and sum(tap.republished.values()) > 0


def sim_args(npz_dir, out, transport, *extra):
    args = ["--config", "configs/quickstart.yaml", "--out", str(out), "--transport", transport]
    for item in npz_overrides(npz_dir, devices=2, rounds=2):
        args += ["--set", item]
    return args + list(extra)


def test_memory_run_over_an_at_least_once_bus_sends_and_counts_each_upload_once(npz_dir, tmp_path, monkeypatch,
                                                                                caplog):
    from edgefl_cli import simulation
    from edgefl_cli.sim import main
    taps = []
    write = simulation.write_deployment

    def write_and_tap(cfg, out_dir, url):
        deployment = write(cfg, out_dir, url)
        taps.append(AtLeastOnce(MemoryBus.named(url.split("://", 1)[1]).client("tap"), deployment.runtime.run_id))
        return deployment
    monkeypatch.setattr(simulation, "write_deployment", write_and_tap)
    caplog.set_level(logging.INFO, logger="edgefl.agent")
    out = tmp_path / "run"
    assert main(sim_args(npz_dir, out, "memory", "--log-level", "WARNING")) == 0
    check_run(json.loads((out / "report.json").read_text()), taps[0], caplog.text)
    assert "ignoring an announcement of round 0" in caplog.text


@pytest.mark.integration
@pytest.mark.system  # two runs of real processes: 30-40 s each on 2 idle cores, over 100 s on busy ones
@pytest.mark.parametrize("duplicate", [False, True], ids=["clean", "at-least-once"])
def test_mqtt_run_sends_and_counts_each_upload_once(npz_dir, tmp_path, broker, duplicate):
    """A clean run over a real mosquitto (and the same with a broker that delivers some messages twice): no
    agent re-sends a round, the runtime rejects nothing as stale, and bytes_up is what the agents' accepted
    transfers put on the wire."""
    from edgefl_cli.sim import main
    from edgefl_core.transport.mqtt import MqttTransport
    tap_transport = MqttTransport(broker.url, "at-least-once")
    tap = AtLeastOnce(tap_transport, "quickstart", duplicate)
    tap_transport.connect()
    try:
        out = tmp_path / "run"
        assert main(sim_args(npz_dir, out, "mqtt", "--broker", broker.url)) == 0
    finally:
        tap_transport.close()
    logs = "".join((out / "logs" / f"dev{i}.log").read_text() for i in range(2))
    check_run(json.loads((out / "report.json").read_text()), tap, logs)
    assert "stale_round" not in (out / "logs" / "runtime.log").read_text()
    # each agent's own count of what it had accepted agrees with the runtime's
    report = json.loads((out / "report.json").read_text())
    for i in range(2):
        text = (out / "logs" / f"dev{i}.log").read_text()
        said = sum(int(line.split(" bytes on the wire")[0].rsplit(" ", 1)[1]) for line in text.splitlines()
                   if " bytes on the wire" in line)
        assert said == report["devices"][f"dev{i}"]["bytes_up"]
