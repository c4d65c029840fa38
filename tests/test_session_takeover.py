"""Two processes with one broker identity (client id) on a real mosquitto: the newer takes the session over
(MQTT 5 DISCONNECT reason 0x8E) and the older stops instead of reconnecting, which would take it back and start
a fight that lasts as long as both run (each reconnect kicking the other off: lost deliveries, flapping
presence). Before this, two ingest workers of one shard (or two agents of one device) flapped forever."""
import subprocess
import sys
import time

from cloud_runtime.config import load_runtime_config
from cloud_runtime.ingest_worker import RECLAIM_WAIT_S, TAKEN_OVER_EXIT, IngestWorker, presence
from edgefl_core.transport import MemoryBus
from edgefl_core.transport.inbox import drain
from edgefl_core.transport.mqtt import MqttTransport
from edgefl_core.wire import Topics, decode_frame
from conftest import wait_until
from test_ingest_workers import start


def cfg_topics(cfg):
    return Topics(cfg.run_id)


def test_a_broker_that_says_session_taken_over_stops_the_transport_reconnecting():
    # mosquitto 2.0 closes the older connection without a DISCONNECT; EMQX and HiveMQ send reason 0x8E
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode
    t = MqttTransport("mqtt://127.0.0.1:1", "same-id")
    calls = []
    t._client.disconnect = lambda *a, **k: calls.append("disconnect")  # what ends paho's reconnect loop
    t._on_disconnect(t._client, None, None, ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E), None)
    assert t.taken_over and calls == ["disconnect"] and not t.connected
    other = MqttTransport("mqtt://127.0.0.1:1", "other-id")
    other._on_disconnect(other._client, None, None, ReasonCode(PacketTypes.DISCONNECT, identifier=0x80), None)
    assert not other.taken_over  # any other failure: reconnect as before


def test_two_workers_of_a_shard_in_memory_the_later_claim_wins_and_a_dropped_link_is_reclaimed(tmp_path):
    bus = MemoryBus()
    cfg = load_runtime_config(None, ["run_id=takeover", "ingest.workers=2", f"state_dir={tmp_path}"])
    first = IngestWorker(cfg, bus.client("w1"), 1)
    start(first)
    drain(first.inbox, first.handle, 0.01)
    assert first.claim_seen and first.generation == 1 and not first.taken_over
    second = IngestWorker(cfg, bus.client("w2"), 1)
    assert second.start()
    drain(second.inbox, second.handle, 0.01)   # the retained claim of the first: it claims above it at once
    second._keep_claim()
    assert second.generation == 2
    for w in (first, second):
        drain(w.inbox, w.handle, 0.01)
    assert first.taken_over and "claim 2 above this one's 1" in first.superseded_by
    assert not second.taken_over
    # the second's link drops: the broker publishes its Last Will; back, it says online again at once
    bus._publish(cfg_topics(cfg).ingest_status(1), presence("takeover", 1, "offline", 2, second.instance, 2), True)
    second._was_connected = False
    second._keep_claim(now=0.0)
    assert second._reclaim_at == RECLAIM_WAIT_S
    drain(second.inbox, second.handle, 0.01)
    second._keep_claim()
    retained = []
    bus.client("probe").subscribe(cfg_topics(cfg).ingest_status(1), lambda t, p: retained.append(p))
    assert decode_frame(retained[-1])[0]["data"]["state"] == "online"
    assert decode_frame(retained[-1])[0]["data"]["instance"] == second.instance and not second.taken_over


def test_two_workers_claiming_at_once_end_with_exactly_one(tmp_path):
    bus = MemoryBus()
    cfg = load_runtime_config(None, ["run_id=takeover", "ingest.workers=2", f"state_dir={tmp_path}"])
    a, b = IngestWorker(cfg, bus.client("a"), 0), IngestWorker(cfg, bus.client("b"), 0)
    for w in (a, b):   # no retained presence: both claim generation 1 after the wait
        assert w.start()
    for w in (a, b):
        w._keep_claim(now=float("inf"))
    for _ in range(3):
        for w in (a, b):
            drain(w.inbox, w.handle, 0.01)
            w._keep_claim(now=float("inf"))
    assert sorted([a.taken_over, b.taken_over]) == [False, True]   # the tie goes by instance id
    survivor = a if b.taken_over else b
    retained = []
    bus.client("probe").subscribe(cfg_topics(cfg).ingest_status(0), lambda t, p: retained.append(p))
    assert decode_frame(retained[-1])[0]["data"]["instance"] == survivor.instance


def test_a_second_ingest_worker_of_a_shard_takes_over_and_the_first_exits_with_status_3(broker, tmp_path):
    config = tmp_path / "runtime.yaml"
    config.write_text(f"run_id: takeover\nbroker: {{url: 'mqtt://127.0.0.1:{broker.port}'}}\n"
                      f"ingest: {{workers: 2, spawn: false}}\nstate_dir: {tmp_path / 'state'}\n")
    cmd = [sys.executable, "-m", "edgefl_cli.ingest", "--config", str(config), "--shard", "1"]
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[0].open("w"))
    second = None
    try:
        wait_until(lambda: "serving run" in logs[0].read_text(), timeout=30)
        claims = []   # the first has claimed the shard (2 s after start without a presence): the second comes later
        watcher = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", "watcher")
        watcher.subscribe(Topics("takeover").ingest_status(1), lambda t, p: claims.append(decode_frame(p)[0]["data"]))
        watcher.connect(timeout=10)
        wait_until(lambda: any(c["pid"] == first.pid and c["state"] == "online" for c in claims), timeout=30)
        watcher.close()
        second = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=logs[1].open("w"))
        assert first.wait(timeout=30) == TAKEN_OVER_EXIT
        assert "took over its session" in logs[0].read_text()
        time.sleep(4.0)  # the first's reconnects, until it read the newer claim, kicked the second off a few times
        assert second.poll() is None  # the newer one serves the shard
        assert "took over" not in logs[1].read_text() and logs[1].read_text().count("disconnected") <= 4
        assert logs[1].read_text().count("serving run") == 1
        settled = logs[1].read_text().count("disconnected")
        time.sleep(3.0)
        assert logs[1].read_text().count("disconnected") == settled   # settled: no more fighting
        probe, retained = MqttTransport(f"mqtt://127.0.0.1:{broker.port}", "probe"), []
        probe.subscribe(Topics("takeover").ingest_status(1), lambda t, p: retained.append(decode_frame(p)[0]["data"]))
        probe.connect(timeout=10)
        wait_until(lambda: retained, timeout=10)
        probe.close()
        assert retained[-1]["state"] == "online" and retained[-1]["pid"] == second.pid
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=15)


def test_the_pool_does_not_restart_a_worker_another_took_over_but_restarts_one_that_died():
    from cloud_runtime.ingest_worker import WorkerPool

    class Pool(WorkerPool):
        def command(self, shard):
            return [sys.executable, "-c", f"import sys; sys.exit({[TAKEN_OVER_EXIT, 1, 2][shard]})"]
    pool = Pool("unused.yaml", [], 3, restart_delay_s=0.1)
    try:
        wait_until(lambda: 0 not in pool.procs and 2 not in pool.procs and pool.restarts >= 2, timeout=20)
        assert 1 in pool.procs  # a crashed worker is started again; a taken-over or misconfigured one is not
    finally:
        pool.close(grace_s=2)


def test_an_older_workers_claim_handed_out_again_by_a_restarted_broker_does_not_stop_the_newer(tmp_path):
    # a broker killed and restarted from its saved state hands out the presence it saved: maybe the claim of a
    # worker two generations back, dead since. The newer worker must say online again, not stop
    bus = MemoryBus()
    cfg = load_runtime_config(None, ["run_id=takeover", "ingest.workers=2", f"state_dir={tmp_path}"])
    topic = Topics("takeover").ingest_status(1)
    bus._publish(topic, presence("takeover", 1, "online", 2, "worker-two-back", 2), True)
    worker = IngestWorker(cfg, bus.client("w"), 1)
    start(worker)
    drain(worker.inbox, worker.handle, 0.01)
    assert worker.generation == 3 and worker.claim_seen
    bus._publish(topic, presence("takeover", 1, "online", 2, "worker-three-back", 1), True)  # the saved copy
    bus._publish(topic, presence("takeover", 1, "offline", 2, "died-newer", 4), True)        # a dead one's Will
    drain(worker.inbox, worker.handle, 0.01)
    assert not worker.taken_over and worker._reclaim_at is not None
    worker._keep_claim()
    seen = []
    bus.client("probe").subscribe(topic, lambda t, p: seen.append(decode_frame(p)[0]["data"]))
    assert seen[-1]["instance"] == worker.instance and seen[-1]["state"] == "online"


def test_the_runtime_calls_a_presence_not_renewed_stale(tmp_path, caplog):
    import time as _time
    from test_ingest_workers import cluster, settle
    from cloud_runtime import shards
    bus, rt, workers, downs = cluster(tmp_path)
    settle(rt, workers)
    assert rt.shards.worker_status[0]["state"] == "online"
    rt.shards.worker_status[0]["seen"] -= shards.STALE_PRESENCE_S + 1   # as if worker 0 went silent
    rt.shards._checked = 0
    rt.pump(0.01)
    assert rt.shards.worker_status[0]["state"] == "stale" and rt.shards.worker_status[1]["state"] == "online"
    assert "ingest shards without a live worker: {0: 'stale'}" in caplog.text
    workers[0]._say_online()   # its renewal brings it back
    settle(rt, workers)
    assert rt.shards.worker_status[0]["state"] == "online"


def test_a_worker_the_broker_refuses_exits_2_naming_its_own_account(tmp_path, monkeypatch, caplog):
    from edgefl_cli import ingest
    from edgefl_core.config import ConfigError
    config = tmp_path / "runtime.yaml"
    config.write_text("run_id: refused\nbroker: {url: 'memory://refused', username: ops}\n"
                      "ingest: {workers: 2, passwords: [a, b]}\n")

    def refused(self, parent_pid=None):
        raise ConfigError("the broker refused user 'ops-ingest-1': Not authorized")
    monkeypatch.setattr(ingest.IngestWorker, "serve", refused)
    assert ingest.main(["--config", str(config), "--shard", "1"]) == 2
    assert "logs in as 'ops-ingest-1' with ingest.passwords[1]" in caplog.text


def test_a_shard_past_the_last_is_a_named_error_not_a_traceback(tmp_path, caplog):
    from edgefl_cli import ingest
    config = tmp_path / "runtime.yaml"
    config.write_text("run_id: r\nbroker: {url: 'memory://r', username: ops}\ningest: {workers: 3, passwords: [a, b, c]}\n")
    assert ingest.main(["--config", str(config), "--shard", "3"]) == 2
    assert "a shard is in [0, 2]" in caplog.text


def test_a_spawned_worker_that_was_taken_over_is_started_again_once_its_shard_has_no_live_worker(tmp_path):
    """The runtime's pool does not restart a worker another one took over (they would fight), but once the
    shard has had no live worker for STALE_PRESENCE_S the one that took over has gone: the shard is told to the
    pool (Shards.on_unserved), which starts its worker again; shards with a live worker, or whose worker stopped
    on a configuration error, are left alone."""
    from test_ingest_workers import cluster, settle
    from cloud_runtime import shards
    from cloud_runtime.ingest_worker import WorkerPool
    bus, rt, workers, downs = cluster(tmp_path)
    settle(rt, workers)
    pool = WorkerPool("unused.yaml", [], 0)   # no processes: _start is recorded instead
    started = []
    pool._start = started.append
    pool.taken_over.add(1)                    # as the watcher records a TAKEN_OVER_EXIT of shard 1's worker
    rt.shards.on_unserved = pool.resume
    workers[1].close()                        # the worker serving shard 1 stops: "offline"
    settle(rt, workers)
    assert rt.shards.worker_status[1]["state"] == "offline"
    rt.shards._checked = 0
    rt.pump(0.01)                             # offline for less than STALE_PRESENCE_S: not yet
    time.sleep(1.0)
    assert started == []
    rt.shards.worker_status[1]["since"] -= shards.STALE_PRESENCE_S + 1
    rt.shards.worker_status[0]["since"] -= shards.STALE_PRESENCE_S + 1   # online: never resumed
    rt.shards._checked = 0
    rt.pump(0.01)
    wait_until(lambda: started == [1], 5)
    assert pool.taken_over == set()
    pool.resume(1)                            # only what was taken over, and only once
    pool.resume(0)
    time.sleep(1.0)
    pool.close()
    assert started == [1] and pool.restarts == 1


def test_a_renewal_queued_behind_a_backlog_does_not_make_a_live_worker_stale(tmp_path):
    """A server phase of 100 s without handling messages: the workers renewed their presence during it, but
    the renewals wait in the inbox behind what came before them. Staleness is judged as of when the runtime
    has handled messages up to (not the wall clock), so a live worker is never called stale (nor logged as
    gone) for a renewal it had sent."""
    from test_ingest_workers import cluster, settle
    bus, rt, workers, downs = cluster(tmp_path)
    settle(rt, workers)
    now = time.monotonic()
    for status in rt.shards.worker_status.values():   # their last presence handled 100 s ago
        status["seen"] = now - 100
    rt.shards._checked = 0
    handle = rt.handle

    def slow(topic, payload):
        if topic == "slow":
            time.sleep(0.025)
            return
        handle(topic, payload)
    rt.handle = slow
    for k in range(40):          # 1 s of work that came early in the phase, then the renewals, 30 s in
        rt.inbox.put("slow", b"", arrived=now - 99 + k * 0.01)
    renewals = []
    for w in workers:
        w.transport.publish = lambda topic, payload, **kw: renewals.append((topic, payload))
        w._say_online()
    for topic, payload in renewals:
        rt.inbox.put(topic, payload, arrived=now - 70)
    while not rt.inbox.empty():
        rt.pump(0.01)
        assert {k: v["state"] for k, v in rt.shards.worker_status.items()} == {0: "online", 1: "online"}
    assert {k: v["state"] for k, v in rt.shards.worker_status.items()} == {0: "online", 1: "online"}
