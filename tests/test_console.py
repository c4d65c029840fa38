"""The operator's console (docs/CONSOLE.md): the JSON API, /metrics and the page's files, served from a live
runtime on its own thread; the token and loopback rules; counters that match report.json; multiprocess mode.
The browser test over a real broker and real processes is tests/test_console_browser.py (system tier)."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_runtime.config import load_config, load_runtime_config
from cloud_runtime.console import start_console
from cloud_runtime.console.views import QueryError, StatusBoard, query_devices
from cloud_runtime.service import CloudRuntime
from conftest import make_npz_dataset, wait_until
from edge_sdk import protocol as P
from edgefl_core.config import ConfigError
from edgefl_core.transport import MemoryBus
from edgefl_cli.simulation import run_in_memory

ROOT = Path(__file__).resolve().parents[1]
RUN = "con"
TOKEN = "s3cret-token-for-the-console-0123"


def get(url: str, headers: dict | None = None, method: str = "GET"):
    """(status, headers, body) of a request; HTTP errors are answers too."""
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def metrics(text: str) -> dict:
    """{(name, frozenset(labels)): value} of an exposition page, parsed by prometheus_client's parser."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def register(rt, device: str, samples: int = 10) -> None:
    rt.enqueue(rt.topics.up(device), P.control_frame(
        P.REGISTER, run=RUN, device=device, round_=-1, num_classes=10, feature_channels=16, train_samples=samples,
        test_samples=0, input_shape=[1, 28, 28], model="resnet8_gkt", profile="raspberry_pi_4"))


@pytest.fixture
def live(tmp_path, monkeypatch):
    """A runtime over the in-memory bus with its console on a free port, pumped by a thread like serve()."""
    def make(*overrides, token=None):
        if token:
            monkeypatch.setenv("EDGEFL_CONSOLE_TOKEN", token)
        cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "rounds=1",
                                         "console.address=127.0.0.1:0", "console.refresh_s=0.1",
                                         "server.model_kwargs={width: 0.25}", *overrides])
        rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
        rt.start()
        console = start_console(rt)
        stop = threading.Event()
        pump = threading.Thread(target=lambda: [rt.pump(0.02) for _ in iter(stop.is_set, True)], daemon=True)
        pump.start()
        made.append((rt, console, stop, pump))
        return rt, console

    made = []
    yield make
    for rt, console, stop, pump in made:
        stop.set()
        pump.join(10)
        if console is not None:
            console.stop()
        rt.close()


def api(console, path: str, **kw) -> dict:
    status, _, body = get(console.url.rstrip("/") + path, **kw)
    assert status == 200, body
    return json.loads(body)


def test_the_fleet_table_shows_devices_and_a_quarantined_device_with_its_cause(live):
    rt, console = live()
    register(rt, "dev0")
    register(rt, "mallory")
    wait_until(lambda: api(console, "/api/status")["devices"]["registered"] == 2, timeout=60)
    for _ in range(rt.cfg.validation.quarantine_after):  # a valid credential, then junk: a type nobody sends
        rt.enqueue(rt.topics.up("mallory"), P.encode_frame({"type": "<img src=x onerror=alert(1)>", "run": RUN,
                                                            "device": "mallory", "round": 0, "data": {}}))
    wait_until(lambda: api(console, "/api/status")["devices"]["quarantined"] == 1, timeout=20)
    page = api(console, "/api/devices?state=quarantined")
    assert page["matched"] == 1 and page["total"] == 2
    row = page["devices"][0]
    assert row["device"] == "mallory" and row["quarantined"] and row["quarantined_until"] > time.time()
    assert row["quarantine_cause"]["reason"] == "bad_type" and "<img" in row["quarantine_cause"]["detail"]
    assert row["rejected"] == 5 and row["rejection_reasons"] == {"bad_type": 5}
    assert row["profile"] == "raspberry_pi_4" and row["predicted_step_s"] > 0  # the profile's roofline estimate
    status = api(console, "/api/status")
    assert status["rejections"] == {"bad_type": 5} and status["phase"]["name"] == "starting"
    kinds = [e["kind"] for e in status["events"]]
    assert "quarantined" in kinds and kinds.count("registered") == 2
    assert api(console, "/api/devices?q=dev&sort=device")["devices"][0]["device"] == "dev0"
    assert api(console, "/api/rounds") ["rounds"] == []
    status, _, body = get(console.url + "api/devices?sort=__class__")
    assert status == 400 and b"sort must be one of" in body


def test_metrics_parse_and_the_counters_match_the_report(live):
    rt, console = live("console.max_device_series=2")
    for name in ("a0", "a1", "a2", "a3"):
        register(rt, name)
    rt.enqueue(rt.topics.up("a3"), b"not a frame")
    rt.enqueue(rt.topics.up("nobody"), P.control_frame(P.HEARTBEAT, run=RUN, device="x", round_=0))
    wait_until(lambda: sum(rt.registry.rejections.values()) == 2, timeout=60)
    wait_until(lambda: api(console, "/api/status")["devices"]["online"] == 4, timeout=20)  # the views caught up
    status, headers, body = get(console.url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    m = metrics(body.decode())
    report = rt.report()["final"]
    assert m[("edgefl_messages_received_total", frozenset())] == report["messages_in"] == 6
    for reason, n in report["rejections"].items():
        assert m[("edgefl_rejected_messages_total", frozenset({("reason", reason)}))] == n
    assert m[("edgefl_devices", frozenset({("state", "online")}))] == 4
    # per-device series are capped: two devices by name, the rest in the series with an empty device label
    devices = {dict(labels)["device"] for (name, labels) in m if name == "edgefl_device_online"}
    assert devices == {"a0", "a1", ""}
    assert m[("edgefl_device_online", frozenset({("device", "")}))] == 2
    assert m[("edgefl_device_series_aggregated", frozenset())] == 2
    assert m[("edgefl_device_rejected_messages_total", frozenset({("device", "")}))] == 1
    # the OpenMetrics page (what Prometheus asks for) parses too
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
    status, headers, body = get(console.url + "metrics", {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert sum(1 for _ in openmetrics(body.decode())) > 10


def test_the_page_and_its_files_are_served_read_only_with_a_strict_policy(live):
    rt, console = live()
    status, headers, body = get(console.url)
    assert status == 200 and b"<title>edgefl console</title>" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    for asset in ("static/console.js", "static/console.css", "static/vendor/uPlot.iife.min.js"):
        assert get(console.url + asset)[0] == 200
    assert get(console.url + "static/../views.py")[0] in (403, 404)
    assert get(console.url + "static/%2e%2e/views.py")[0] in (403, 404)
    assert get(console.url + "static/")[0] in (403, 404)  # no directory listing
    for method in ("POST", "PUT", "DELETE"):  # nothing here changes the run
        assert get(console.url + "api/status", method=method)[0] == 405


def test_with_a_token_every_route_but_healthz_needs_it(live):
    rt, console = live(token=TOKEN)
    assert get(console.url + "healthz")[0] == 200
    for path in ("", "api/status", "api/devices", "metrics", "static/console.js"):
        status, headers, _ = get(console.url + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert get(console.url + path, {"Authorization": "Bearer wrong-token-of-some-length"})[0] == 401
    assert get(console.url + "api/status", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert get(console.url + "api/status", {"Authorization": f"bearer {TOKEN}"})[0] == 200  # RFC 7235: any case
    # a browser opens /?token=... once: the token moves into an HttpOnly cookie and out of the address bar
    status, headers, _ = get(console.url + f"?token={TOKEN}")
    assert status == 302 and headers["Location"] == "/"
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert get(console.url + "api/devices", {"Cookie": cookie.split(";")[0]})[0] == 200
    assert get(console.url + "?token=nope")[0] == 401


def test_a_non_loopback_console_without_a_token_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEFL_CONSOLE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"console.address: 0.0.0.0:8470 is not a loopback address and no token"):
        load_runtime_config(None, ["console.address=0.0.0.0:8470"])
    with pytest.raises(ConfigError, match=r"console.token_file: .* at least 16"):
        (tmp_path / "short").write_text("abc\n")
        load_runtime_config(None, ["console.address=0.0.0.0:8470", f"console.token_file={tmp_path / 'short'}"])
    with pytest.raises(ConfigError, match=r"console.address: expected host:port"):
        load_runtime_config(None, ["console.address=localhost"])
    (tmp_path / "token").write_text(TOKEN + "\n")
    cfg = load_runtime_config(None, ["console.address=0.0.0.0:8470", f"console.token_file={tmp_path / 'token'}"])
    assert cfg.console.token() == TOKEN
    assert load_runtime_config(None, ['console.address="[::1]:0"']).console.token() is None  # loopback: no token
    # the CLI: exit 2 with the message, before anything starts
    (tmp_path / "runtime.yaml").write_text("console:\n  address: 192.0.2.1:8470\n")
    proc = subprocess.run([sys.executable, "-m", "edgefl_cli.runtime", "serve", "--config", str(tmp_path / "runtime.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k != "EDGEFL_CONSOLE_TOKEN"})
    assert proc.returncode == 2 and "192.0.2.1:8470 is not a loopback address" in proc.stderr


def test_a_simulation_keeps_any_free_port_when_it_sets_other_console_keys(tmp_path, monkeypatch):
    assert load_config(None).console.address == "127.0.0.1:0"
    assert load_config(None, ["console.linger_s=60"]).console.address == "127.0.0.1:0"
    assert load_config(None, ["console.address=127.0.0.1:9999"]).console.address == "127.0.0.1:9999"
    assert load_runtime_config(None, ["console.linger_s=1"]).console.address == "127.0.0.1:8470"  # a service's
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"^console.token_file: .*empty: its first line must be the token$"):
        load_runtime_config(None, [f"console.token_file={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"^console.token_file: cannot read a token from .*absent"):
        load_runtime_config(None, [f"console.token_file={tmp_path / 'absent'}"])
    monkeypatch.setenv("EDGEFL_CONSOLE_TOKEN", "short")
    with pytest.raises(ConfigError, match=r"^EDGEFL_CONSOLE_TOKEN \(environment\): the console token must"):
        load_runtime_config(None, [])


def test_a_taken_address_leaves_the_run_without_a_console_and_says_so(live):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        rt, console = live(f"console.address=127.0.0.1:{port}")
        assert console is None
        assert rt.console_info["url"] is None and "in use" in rt.console_info["error"]
        assert rt.report()["run"]["console"]["error"]
        register(rt, "dev0")  # the run goes on
        wait_until(lambda: "dev0" in rt.registry.devices, timeout=60)


def test_nobody_watching_costs_the_serve_thread_nothing():
    board = StatusBoard(refresh_s=0.1)

    class Exploding:  # any rebuild would touch the runtime
        def __getattr__(self, name):
            raise AssertionError("the views were rebuilt with nobody watching")

    board.refresh(Exploding())  # never read: not due
    board.read()
    assert board.due()


def test_query_devices_filters_sorts_with_missing_values_last_and_pages():
    rows = [{"device": f"d{i}", "profile": "host" if i % 2 else "jetson", "engine": "torch", "online": i != 3,
             "quarantined": i == 4, "step_time_s": None if i == 2 else float(i)} for i in range(6)]
    page = query_devices(rows, {"sort": "step_time_s", "order": "desc", "limit": "3"})
    assert [r["device"] for r in page["devices"]] == ["d5", "d4", "d3"] and page["matched"] == 6
    page = query_devices(rows, {"sort": "step_time_s", "offset": "4"})
    assert [r["device"] for r in page["devices"]] == ["d5", "d2"]  # None sorts last in either order
    assert [r["device"] for r in query_devices(rows, {"state": "offline"})["devices"]] == ["d3"]
    assert [r["device"] for r in query_devices(rows, {"state": "quarantined"})["devices"]] == ["d4"]
    assert query_devices(rows, {"q": "JETSON"})["matched"] == 3
    for bad in ({"limit": "0"}, {"limit": "5000"}, {"offset": "-1"}, {"offset": "1e9"}, {"order": "up"},
                {"state": "gone"}, {"sort": "rejection_reasons"}):
        with pytest.raises(QueryError, match=next(iter(bad))):
            query_devices(rows, bad)


def test_a_simulation_scraped_during_its_run_ends_with_counters_equal_to_report_json(tmp_path):
    data = make_npz_dataset(tmp_path / "data", n_train=120, n_test=40)
    port = _free_port()
    cfg = load_config("configs/quickstart.yaml", [
        "data.dataset=npz", f"data.path={data}", "data.train_subset=null", "run.devices=2", "run.rounds=3",
        "edge.model_kwargs={stem_stride: 2}", "server.model_kwargs={width: 0.5}",
        f"console.address=127.0.0.1:{port}", "console.refresh_s=0.2", "console.linger_s=120"])
    stop, scrapes, phases = threading.Event(), [], []

    def scrape():
        url = f"http://127.0.0.1:{port}/"
        while not stop.is_set():
            try:
                phase = json.loads(get(url + "api/status")[2])["phase"]["name"]
                scrapes.append(metrics(get(url + "metrics")[2].decode()))
                phases.append(phase)
                if phase == "finished":
                    stop.set()  # ends the console's linger
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.2)

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    run_in_memory(cfg, tmp_path / "out", stop=stop)
    scraper.join(10)
    assert "finished" in phases and any(p != "finished" for p in phases), phases  # during the run, and at its end
    messages = [s.get(("edgefl_messages_received_total", frozenset()), 0) for s in scrapes]
    assert messages == sorted(messages)  # a counter never goes down
    last, report = scrapes[-1], json.loads((tmp_path / "out" / "runtime" / "report.json").read_text())
    final = report["final"]
    assert last[("edgefl_rounds_completed_total", frozenset())] == final["rounds"] == 3
    assert last[("edgefl_accepted_samples_total", frozenset())] == final["accepted_samples"] == 360
    assert last[("edgefl_uplink_bytes_total", frozenset({("outcome", "accepted")}))] == final["bytes_up"]
    assert last[("edgefl_downlink_bytes_total", frozenset())] == final["bytes_down"]
    assert last[("edgefl_messages_received_total", frozenset())] == final["messages_in"]
    assert last[("edgefl_test_accuracy", frozenset())] == pytest.approx(final["test_accuracy"])
    assert report["run"]["console"]["url"] == f"http://127.0.0.1:{port}/"


def test_multiprocess_mode_adds_up_the_counters_of_every_process(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (the library's multiprocess mode) /metrics sums what each process counted."""
    script = textwrap.dedent("""
        import multiprocessing as mp, sys
        from prometheus_client import generate_latest
        from cloud_runtime.telemetry import Telemetry
        from cloud_runtime.console.views import StatusBoard
        from cloud_runtime.console.metrics import metrics_registry

        def ingest(n):
            t = Telemetry()
            t.counters.messages.inc(n)
            t.counters.bytes("up", 100 * n)

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            for n in (3, 4):
                p = ctx.Process(target=ingest, args=(n,)); p.start(); p.join()
            t = Telemetry()
            sys.stdout.write(generate_latest(metrics_registry(StatusBoard(), t, 100)).decode())
    """)
    (tmp_path / "mp.py").write_text(script)
    (tmp_path / "prom").mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"), PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(tmp_path / "mp.py")], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    m = metrics(out)
    assert m[("edgefl_messages_received_total", frozenset())] == 7
    assert m[("edgefl_uplink_bytes_total", frozenset({("outcome", "accepted")}))] == 700


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- what an attacker with a valid credential, or an unlucky fleet, tried (review of the console) -----------


def heartbeat(rt, device: str, raw_data: str) -> None:
    """A heartbeat frame with ``raw_data`` as its JSON data, verbatim (huge integers, odd types)."""
    header = ('{"v":1,"type":"heartbeat","run":"%s","device":"%s","round":0,"data":%s}' % (RUN, device, raw_data)).encode()
    rt.enqueue(rt.topics.heartbeat(device), P.MAGIC + len(header).to_bytes(4, "big") + header)


def test_a_heartbeat_with_a_huge_integer_or_odd_types_does_not_freeze_the_views(live):
    rt, console = live()
    register(rt, "dev0")
    wait_until(lambda: api(console, "/api/status")["devices"]["registered"] == 1, timeout=60)
    heartbeat(rt, "dev0", '{"step_time_s": 1%s, "rss_mb": true, "x": {"deep": [1]}}' % ("0" * 400))
    wait_until(lambda: "heartbeat" in rt.registry.devices["dev0"], timeout=20)
    assert rt.registry.devices["dev0"]["heartbeat"] == {}  # nothing kept: not a float64, a bool, a nested value
    register(rt, "dev1")  # the views go on being rebuilt
    wait_until(lambda: api(console, "/api/status")["devices"]["registered"] == 2, timeout=20)
    heartbeat(rt, "dev1", '{"step_time_s": "slow", "rss_mb": 1e308}')  # one device's claims: its row only
    wait_until(lambda: rt.registry.devices["dev1"].get("heartbeat"), timeout=20)
    heartbeat(rt, "dev0", '{"step_time_s": -1000, "rss_mb": 512}')
    wait_until(lambda: rt.registry.devices["dev0"]["heartbeat"].get("rss_mb") == 512, timeout=20)
    time.sleep(0.5)
    rows = {d["device"]: d for d in api(console, "/api/devices")["devices"]}
    assert rows["dev1"]["step_time_s"] is None and rows["dev1"]["peak_rss_mb"] is None  # not a step time, absurd
    assert rows["dev0"]["step_time_s"] is None and rows["dev0"]["peak_rss_mb"] == 512  # negative: missing
    m = metrics(get(console.url + "metrics")[2].decode())
    assert m[("edgefl_device_peak_rss_bytes", frozenset({("device", "dev0")}))] == 512 * 2**20  # MiB -> bytes
    assert rows["dev0"]["predicted_step_s"] > 0 and rows["dev1"]["predicted_step_s"] == rows["dev0"]["predicted_step_s"]


def test_the_model_is_costed_once_whatever_the_profiles_devices_claim(live, monkeypatch):
    """Predictions for many profiles (or profile names a device makes up) count the model's FLOPs once: the
    serve thread is never held by FLOP counting per profile."""
    import device_profiles.cost_report as cost_report
    calls = []
    real = cost_report.model_cost
    monkeypatch.setattr(cost_report, "model_cost", lambda *a, **k: calls.append(a) or real(*a, **k))
    rt, console = live()
    profiles = ["raspberry_pi_4", "raspberry_pi_5", "jetson_nano", "host", "made_up_1", "made_up_2", "made_up_3"]
    for i, profile in enumerate(profiles):
        rt.enqueue(rt.topics.up(f"d{i}"), P.control_frame(
            P.REGISTER, run=RUN, device=f"d{i}", round_=-1, num_classes=10, feature_channels=16, train_samples=10,
            test_samples=0, input_shape=[1, 28, 28], model="resnet8_gkt", profile=profile))
    wait_until(lambda: api(console, "/api/status")["devices"]["registered"] == len(profiles), timeout=60)
    rows = {d["device"]: d for d in api(console, "/api/devices")["devices"]}
    assert rows["d0"]["predicted_step_s"] > 0 and rows["d4"]["predicted_step_s"] is None  # an unknown profile
    assert len(calls) == 2  # backprop and inference, once


def test_one_device_cannot_flush_the_event_feed(live):
    rt, console = live()
    register(rt, "mallory")
    for _ in range(rt.cfg.validation.quarantine_after):
        rt.enqueue(rt.topics.up("mallory"), b"junk")
    for i in range(600):  # a quarantined device may still publish its status (the Last Will): flap it
        rt.enqueue(rt.topics.status("mallory"), P.control_frame(P.STATUS, run=RUN, device="mallory", round_=0,
                                                                  online=i % 2 == 0))
    wait_until(lambda: rt.inbox.empty() and rt.telemetry.events_suppressed > 500, timeout=30)
    kinds = [e["kind"] for e in api(console, "/api/status")["events"]]
    assert "quarantined" in kinds and "registered" in kinds


def test_odd_device_names_keep_metrics_parseable_and_apart_from_the_aggregate(live):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
    rt, console = live("console.max_device_series=2")
    names = ["_other", 'a"b\\c', "é\u2028x", "zz", "zz2"]
    for name in names:
        register(rt, name)
    wait_until(lambda: api(console, "/api/status")["devices"]["registered"] == len(names), timeout=60)
    for accept in ({}, {"Accept": "application/openmetrics-text; version=1.0.0"}):
        text = get(console.url + "metrics", accept)[2].decode()
        parse = openmetrics if accept else text_string_to_metric_families
        online = [s for f in parse(text) for s in f.samples if s.name == "edgefl_device_online"]
        assert sorted(s.labels["device"] for s in online) == sorted(["", *sorted(names)[:2]])


def test_hostile_requests_get_a_4xx_and_never_a_redirect_elsewhere(live):
    rt, console = live(token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for query in ("limit=%C2%B2", "offset=%D9%A3", "limit=%F0%9D%9F%97", "limit=1&limit=x", "sort=", "q=" + "x" * 5000):
        status, _, body = get(console.url + "api/devices?" + query, bearer)
        assert status in (200, 400), (query, status, body)
        assert status == 400 or query.startswith(("q=", "limit=1&"))
    assert get(console.url + "static/" + "a" * 400, bearer)[0] == 404
    assert get(console.url + "static/console.js", bearer, method="HEAD")[0] == 405
    status, headers, _ = get(console.url.rstrip("/") + f"//evil.example/?token={TOKEN}")
    assert status == 302 and headers["Location"].startswith("/") and not headers["Location"].startswith("//")
    with pytest.raises(ConfigError, match="printable ASCII"):
        os.environ["EDGEFL_CONSOLE_TOKEN"] = "tøken-with-ümlauts-0123456789"
        load_runtime_config(None, [])


def test_slow_or_piled_up_connections_are_closed(live, monkeypatch):
    from cloud_runtime.console import server as console_server
    monkeypatch.setattr(console_server, "HEADER_TIMEOUT_S", 0.5)
    monkeypatch.setattr(console_server, "MAX_CONNECTIONS", 3)
    rt, console = live()
    host, port = console.url.removeprefix("http://").rstrip("/").split(":")
    slow = socket.create_connection((host, int(port)))
    slow.sendall(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    slow.settimeout(5)
    assert slow.recv(100) == b""  # closed after HEADER_TIMEOUT_S
    held = [socket.create_connection((host, int(port))) for _ in range(3)]
    extra = socket.create_connection((host, int(port)))
    extra.settimeout(5)
    assert extra.recv(100) == b""  # over MAX_CONNECTIONS: closed on arrival
    for s in held + [extra, slow]:
        s.close()
    wait_until(lambda: get(console.url + "healthz")[0] == 200, timeout=10)


def test_a_missing_multiprocess_directory_is_a_clear_configuration_error(monkeypatch, tmp_path):
    from cloud_runtime.telemetry import Telemetry
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="PROMETHEUS_MULTIPROC_DIR=.* is not a directory"):
        Telemetry()


def test_predicting_step_times_leaves_the_runs_random_stream_alone():
    """The views count FLOPs by building the model (which draws initial weights): in a simulation the agents
    share the process's torch generator, so a console must not shift it (same seed, same run)."""
    import torch

    from cloud_runtime.report import CostEstimator
    info = {"model": "resnet8_gkt", "batch_size": 8, "input_shape": [1, 28, 28], "model_kwargs": {},
            "optimizer": "sgd", "profile": "raspberry_pi_4", "engine": "torch"}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    assert StatusBoard().predicted_step(info, CostEstimator()) > 0
    assert torch.equal(torch.rand(3), expected)
