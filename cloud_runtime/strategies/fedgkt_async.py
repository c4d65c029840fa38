"""Asynchronous FedGKT: every device runs rounds at its own pace; each server update trains on whatever
has arrived, and features more than ``max_staleness`` server updates old are not used."""
from __future__ import annotations

import logging
import time

from cloud_runtime.strategies.base import STRATEGIES
from cloud_runtime.strategies.fedgkt import FedGKT
from edge_sdk import protocol as P

logger = logging.getLogger("edgefl.runtime")


@STRATEGIES.register("fedgkt_async")
class FedGKTAsync(FedGKT):
    def __init__(self, ctx):
        super().__init__(ctx)
        self.device_round: dict[str, int] = {}   # device -> the round it was told to run

    def expected_round(self, device: str) -> int:
        return self.device_round.get(device, -1)

    def send_round(self, device: str, round_: int) -> None:
        self.ctx.downlink.send(device, P.ROUND, round_,
                               **self.round_frame(round_, True, [device] if round_ > 0 else []))

    def on_register(self, device: str) -> None:
        """A restarted device picks up where it was: its round is announced again, unless its upload of that
        round is already here (it would only be sent again; the device's next round comes with the server
        update that uses it)."""
        if device in self.device_round:
            round_ = self.device_round[device]
            held = self.train_uploads.get(device)
            if held is None or held.round != round_:
                self.send_round(device, round_)

    def start_newcomers(self) -> None:
        for device in self.ctx.registry.names():  # late registrants join at round 0
            if device not in self.device_round:
                self.device_round[device] = 0
                self.send_round(device, 0)

    def drop_stale(self, round_: int) -> None:
        for device in list(self.train_uploads):
            if self.server_version - self.arrival_version.get(device, 0) > self.cfg.max_staleness:
                del self.train_uploads[device]
                if self.server is not None:
                    self.server.drop_device(device)

    def run(self) -> None:
        ctx = self.ctx
        self.start_newcomers()
        last_update = time.monotonic()
        while self.server_version < self.cfg.rounds and not ctx.stop.is_set():
            if self.ctx.registry.telemetry.phase["name"] != "devices training":
                self.phase("devices training", self.server_version)
            ctx.pump()
            self.start_newcomers()
            fresh = [d for d, up in self.train_uploads.items() if up.round == self.device_round.get(d)]
            if not fresh:
                continue
            self.drop_stale(self.server_version)  # the staleness bound, before choosing what to train on
            start = time.monotonic()
            included = sorted(self.train_uploads)
            version = self.server_version
            row: dict = {"round": version, "participants": included, "fresh": sorted(fresh),
                         "device_rounds": {d: self.train_uploads[d].round for d in included},
                         "staleness": {d: version - self.arrival_version.get(d, version) for d in included},
                         "since_last_update": start - last_update,
                         "server": self.train_and_answer(version, included)}
            self.server_version += 1
            for device in fresh:  # these devices got soft labels for their round: start their next one
                self.device_round[device] += 1
                self.send_round(device, self.device_round[device])
            if (version + 1) % self.cfg.eval_every == 0 or self.server_version == self.cfg.rounds:
                self.evaluate(row)
            else:
                row["test_accuracy"] = None
            self.finish_row(row, start)
            ctx.ingest.new_round()
            last_update = time.monotonic()
            self.next_round = self.server_version
            ctx.checkpoint()

    def snapshot(self) -> dict:
        return {**super().snapshot(), "device_round": self.device_round, "server_version": self.server_version}

    def restore(self, state: dict) -> None:
        self.device_round = {k: int(v) for k, v in state.get("device_round", {}).items()}
        self.server_version = int(state.get("server_version", 0))
        super().restore(state)
