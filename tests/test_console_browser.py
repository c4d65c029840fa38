"""The console in a real browser (system tier): headless Debian Chromium, driven by Selenium through Debian's
chromedriver, loads the console of a live run (edgefl-sim: one cloud-runtime and three edge-agent processes
over a real mosquitto) and the test asserts on the rendered page: the device rows appear, a device with a
valid credential that sends junk shows as quarantined with its reason (as text: the junk is never markup),
and the round number advances. /metrics is scraped during the run and at its end, and the counters match
report.json. The screenshot is written to $EDGEFL_CONSOLE_SCREENSHOT when set (docs/console.png)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import FASHION_MNIST_DIR
from edge_sdk import protocol as P
from model_zoo import create_model

pytestmark = [pytest.mark.integration, pytest.mark.system]
ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
RUN = "console"


def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():  # the system tier needs it: .ci/run installs it like mosquitto
            pytest.fail(f"{path} missing: apt-get install chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1500,1400",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def counters(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait(condition, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception:  # the page is re-rendered under us, the console is not up yet, ...
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"edgefl-sim exited with {proc.returncode} before {what}")
        time.sleep(0.25)
    pytest.fail(f"no {what} within {timeout:.0f} s")


def mallory(broker_url: str, channels: int) -> None:
    """A device with a valid credential (the test broker is anonymous) that registers, then sends junk."""
    import paho.mqtt.client as mqtt
    host, port = broker_url.removeprefix("mqtt://").split(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mallory", protocol=mqtt.MQTTv5)
    client.connect(host, int(port))
    client.loop_start()
    topics = P.Topics(RUN)
    infos = [client.publish(topics.up("mallory"), P.control_frame(
        P.REGISTER, run=RUN, device="mallory", round_=-1, num_classes=10, feature_channels=channels,
        train_samples=100, test_samples=0, input_shape=[1, 28, 28], profile="raspberry_pi_4"), qos=1)]
    time.sleep(1.0)
    for _ in range(5):  # quarantine_after: 5 in a row
        infos.append(client.publish(topics.up("mallory"), P.encode_frame(
            {"type": "<img src=x onerror=document.title='pwned'>", "run": RUN, "device": "mallory", "round": 0,
             "data": {}}), qos=1))
    for info in infos:
        info.wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs Debian's dataset-fashion-mnist")
def test_the_console_of_a_live_run_in_a_real_browser(broker, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    out = tmp_path / "run"
    overrides = [f"run.name={RUN}", "run.devices=3", "run.rounds=8", "data.train_subset=1500", "data.test_subset=600",
                 "server.model_kwargs={width: 0.5}", f"console.address=127.0.0.1:{port}", "console.linger_s=30",
                 "deployment.round_deadline_s=120"]
    args = [sys.executable, "-m", "edgefl_cli.sim", "--config", "configs/quickstart.yaml", "--out", str(out),
            "--broker", broker.url]
    for item in overrides:
        args += ["--set", item]
    log = open(tmp_path / "sim.log", "wb")
    sim = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)))
    driver = None
    try:
        wait(lambda: fetch(url + "healthz") == b"ok\n", 180, "console", sim)
        driver = browser()
        driver.get(url)
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        def cell(device: str, cls: str) -> str:
            return driver.find_element(By.CSS_SELECTOR, f'tr[data-device="{device}"] td.{cls}').text

        wait(lambda: all(driver.find_elements(By.CSS_SELECTOR, f'tr[data-device="dev{i}"]') for i in range(3)),
             180, "device rows", sim)
        wait(lambda: cell("dev0", "state") == "online", 60, "dev0 online", sim)
        first_round = wait(lambda: driver.find_element(By.ID, "round").text.isdigit()
                           and int(driver.find_element(By.ID, "round").text) + 1, 60, "a round number", sim) - 1
        during = counters(fetch(url + "metrics").decode())  # a scrape while the run is on
        assert during[("edgefl_devices", (("state", "online"),))] == 3

        with torch.no_grad():  # what the run's edge model gives: a registration that passes every check
            channels = create_model("resnet8_gkt", num_classes=10, in_channels=1, stem_stride=2)(
                torch.zeros(1, 1, 28, 28))[1].shape[1]
        mallory(broker.url, channels)
        wait(lambda: cell("mallory", "state") == "quarantined", 60, "mallory quarantined", sim)
        cause = cell("mallory", "quarantine")
        assert "bad_type" in cause and "<img src=x" in cause  # shown as text, never as markup
        assert not driver.find_elements(By.CSS_SELECTOR, "#devices-table img, #events img")
        assert driver.title == "edgefl console"
        events = driver.find_element(By.ID, "events").text
        assert "quarantined" in events and "mallory" in events

        wait(lambda: int(driver.find_element(By.ID, "round").text) > first_round, 240, "the round to advance", sim)
        wait(lambda: driver.find_element(By.ID, "accuracy").text.endswith("%"), 240, "an accuracy", sim)
        # sorting and filtering in the page itself
        driver.find_element(By.ID, "filter").send_keys("mall")
        wait(lambda: [r.get_attribute("data-device") for r in
                      driver.find_elements(By.CSS_SELECTOR, "#devices-table tbody tr")] == ["mallory"], 10, "filter")
        driver.find_element(By.ID, "filter").send_keys(Keys.CONTROL + "a", Keys.DELETE)  # fires input: all rows again
        wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#devices-table tbody tr")) == 4, 10, "unfiltered")
        driver.find_element(By.CSS_SELECTOR, 'th[data-sort="bytes_up"]').click()
        driver.find_element(By.CSS_SELECTOR, 'th[data-sort="bytes_up"]').click()  # descending
        wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#devices-table tbody tr")[-1]
             .get_attribute("data-device") == "mallory", 10, "sorted by bytes up")

        status = wait(lambda: (s := json.loads(fetch(url + "api/status")))["phase"]["name"] == "finished" and s,
                      600, "the run to finish", sim)
        time.sleep(2.5)  # the page's next poll renders the final state
        shot = tmp_path / "console.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("EDGEFL_CONSOLE_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["EDGEFL_CONSOLE_SCREENSHOT"])
        final = counters(fetch(url + "metrics").decode())
        report = json.loads((out / "runtime" / "report.json").read_text())
        assert status["rounds_done"] == report["final"]["rounds"] == 8
        assert report["final"]["quarantined"] == ["mallory"]
        f = report["final"]
        assert final[("edgefl_rounds_completed_total", ())] == f["rounds"]
        assert final[("edgefl_accepted_samples_total", ())] == f["accepted_samples"] == 8 * 1500
        assert final[("edgefl_uplink_bytes_total", (("outcome", "accepted"),))] == f["bytes_up"]
        assert final[("edgefl_downlink_bytes_total", ())] == f["bytes_down"]
        for reason, n in f["rejections"].items():
            assert final[("edgefl_rejected_messages_total", (("reason", reason),))] == n
        assert final[("edgefl_quarantines_total", ())] == 1
        assert final[("edgefl_device_quarantined", (("device", "mallory"),))] == 1
        assert during[("edgefl_messages_received_total", ())] <= final[("edgefl_messages_received_total", ())]
        assert sim.wait(120) == 0
    finally:
        if driver is not None:
            driver.quit()
        if sim.poll() is None:
            sim.send_signal(signal.SIGINT)  # the simulator stops its runtime and agents by PID
            try:
                sim.wait(90)
            except subprocess.TimeoutExpired:
                sim.kill()
        log.close()
        if sys.exc_info()[0] is not None:
            print((tmp_path / "sim.log").read_text()[-6000:])
