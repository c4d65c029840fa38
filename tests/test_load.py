"""A small fleet (protocol-only agents) against real mosquitto and the real runtime: nothing may be lost.
The 1,000-agent figures come from ``python -m tools.loadgen`` (docs/LOAD.md)."""
import pytest

from tools.loadgen import run_load

pytestmark = [pytest.mark.integration, pytest.mark.system]


def test_a_hundred_agents_connect_heartbeat_and_upload_without_loss(tmp_path):
    result = run_load(agents=100, workers=2, heartbeats=2, state_dir=tmp_path / "rt")
    assert result["held_connected"] == 100 and result["registered"] == 100
    assert result["uploads_accepted"] == 100 and result["uploads_acked"] == 100 and result["lost_uploads"] == 0
    assert result["lost_heartbeat_devices"] == 0 and not result["rejections"]
    assert result["ack_latency_s"]["p99"] is not None and result["messages_per_s"] > 0


def test_a_fleet_through_two_ingest_workers_loses_nothing(tmp_path):
    result = run_load(agents=40, workers=2, heartbeats=1, state_dir=tmp_path / "rt", ingest_workers=2)
    assert result["uploads_accepted"] == 40 and result["uploads_acked"] == 40 and not result["rejections"]
    assert result["forwarded_transfers"] == 40  # every upload went through a worker
    assert result["fleet_messages"] > 40 * 3 and result["fleet_messages_per_s"] > 0
