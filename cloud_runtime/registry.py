"""The device registry: who is registered, online, quarantined, and what each device was charged with.

Every rejected message is charged here to the device the broker authenticated (the topic's device),
counted by reason, and a device whose messages keep being rejected is quarantined for a while.
"""
from __future__ import annotations

import logging
import re
import time
from collections import Counter

from cloud_runtime.config import RuntimeConfig
from cloud_runtime.telemetry import Telemetry, label_value

logger = logging.getLogger("edgefl.runtime")

MAX_SAMPLES = 10**9
MAX_DETAIL_CHARS = 500      # a rejection's detail as logged and shown
REJECTION_EVENT_EVERY_S = 5.0   # a device's rejections become at most one console event per this many seconds
# rejections that do not count toward quarantine: chunks of a device already quarantined, chunks sent on an
# ingest shard that is no longer the device's (sent before it learnt a new worker count), and messages dropped
# because the runtime (or a worker) held a device's bound of them unhandled (it may have been busy training)
NOT_OFFENCES = frozenset({"quarantined", "wrong_shard", "inbox_full"})
_PROFILE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _count(value, name: str, high: int = MAX_SAMPLES) -> int:
    if type(value) is not int or not 0 <= value <= high:
        raise Rejected("bad_registration", f"{name} must be an integer in [0, {high}], got {str(value)[:40]}")
    return value


def device_facts(data: dict) -> dict:
    """What a registration may tell about the device itself, type- and range-checked (anything else in
    the frame is ignored; how the device trains is the runtime's own recipe, not the device's claim).
    Raises Rejected("bad_registration") naming the field."""
    facts = {"train_samples": _count(data.get("train_samples", 0), "train_samples"),
             "test_samples": _count(data.get("test_samples", 0), "test_samples")}
    profile = data.get("profile")
    if profile is not None and (not isinstance(profile, str) or not _PROFILE_NAME.fullmatch(profile)):
        # a name the runtime looks up among its shipped profiles: never a path on the runtime's host
        raise Rejected("bad_registration", f"profile must be a profile name ([A-Za-z0-9_-], at most 64), got "
                                           f"{str(profile)[:40]!r}")
    shape = data.get("input_shape")
    if shape is not None and (not isinstance(shape, list) or len(shape) != 3
                              or any(type(v) is not int for v in shape)
                              or not (1 <= shape[0] <= 4 and all(1 <= v <= 256 for v in shape[1:]))):
        raise Rejected("bad_registration", f"input_shape must be [C<=4, H<=256, W<=256], got {str(shape)[:60]}")
    for name in ("pid", "edge_params"):
        if data.get(name) is not None:
            facts[name] = _count(data[name], name, 1 << 62)
    engine = data.get("engine", "torch")
    if engine not in ("torch", "onnxruntime"):
        raise Rejected("bad_registration", f"engine must be torch or onnxruntime, got {str(engine)[:20]!r}")
    program = data.get("program")
    if program is not None and (not isinstance(program, str) or not re.fullmatch(r"[0-9a-f]{64}", program)):
        raise Rejected("bad_registration", f"program must be a SHA-256 hex digest, got {str(program)[:40]!r}")
    if engine != "onnxruntime":  # only an onnxruntime device runs an edge program, whatever digest it states
        program = None
    return {**facts, "profile": profile, "input_shape": shape, "engine": engine, "program": program}


HEARTBEAT_FIELDS = 32   # a heartbeat's fields kept (what a device reports about itself: step time, memory, ...)


def heartbeat_fields(data: dict) -> dict:
    """The scalar fields of a heartbeat, bounded: at most :data:`HEARTBEAT_FIELDS` names of at most 64
    characters, numbers that fit a float64 (bool, huge integers and nested values dropped), strings cut to 200
    characters. A heartbeat is the device's claim: it is shown and reported, never trusted further."""
    kept = {}
    for key, value in data.items():
        if len(kept) >= HEARTBEAT_FIELDS or not isinstance(key, str) or len(key) > 64:
            continue
        if value is None or (isinstance(value, float)) or (type(value) is int and abs(value) < 1 << 63):
            kept[key] = value
        elif isinstance(value, str):
            kept[key] = value[:200]
    return kept


class Rejected(Exception):
    """A message the runtime refuses; ``reason`` is the counter's tag, the message says what was wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DeviceLines:
    """At most ``burst`` log lines per device and kind every
    :data:`REJECTION_EVENT_EVERY_S`: a device repeating itself (thousands of registrations, status flaps or
    rejections a second) is a line or two, and its next line says how many were left out."""

    def __init__(self, every_s: float = REJECTION_EVENT_EVERY_S, keep: int = 10_000):
        self.every_s, self.keep = every_s, keep
        self._lines: dict[tuple, list] = {}  # (device, kind) -> [its window's start, lines in it, left out since]

    def take(self, device: str | None, kind: str, burst: int = 1) -> str | None:
        """None: do not log this one (counted); else the suffix for the line (empty, or how many were left out)."""
        now, key = time.monotonic(), (device, kind)  # (a wall clock stepped back would silence a window)
        lines = self._lines.get(key)
        if lines is None or now - lines[0] >= self.every_s:
            if lines is None and len(self._lines) > self.keep:
                self._forget_expired(now)
            self._lines[key] = [now, 1, 0]
            return f" ({lines[2]} more since the last line)" if lines and lines[2] else ""
        if lines[1] < burst:
            lines[1] += 1
            return ""
        lines[2] += 1
        return None

    def _forget_expired(self, now: float) -> None:
        """Drop the windows that are over (their left-out count, if any, is not said); all of them only if
        more than ``keep`` are still open (more devices and kinds at once than it is sized for)."""
        self._lines = {key: lines for key, lines in self._lines.items() if now - lines[0] < self.every_s}
        if len(self._lines) > self.keep:
            self._lines.clear()


class DeviceRegistry:
    """``devices[name]`` is a JSON-able dict: registration fields, online state, byte counters, rejections."""

    def __init__(self, cfg: RuntimeConfig, telemetry: Telemetry | None = None):
        self.cfg = cfg
        self.telemetry = telemetry or Telemetry()
        self.devices: dict[str, dict] = {}
        self.rejections: Counter = Counter()
        self.offences: Counter = Counter()   # offences outstanding per device (an acceptance takes one off)
        self.lines = DeviceLines()   # what one device repeats is logged once every few seconds

    def log(self, device: str, kind: str, message: str, *args, level: int = logging.INFO) -> None:
        """Log ``message % args`` unless ``device`` said the like (``kind``) 3 times in the last few seconds
        (:class:`DeviceLines`); the next line it logs counts the ones left out."""
        if (suffix := self.lines.take(device, kind, burst=3)) is not None:
            logger.log(level, message + "%s", *args, suffix, stacklevel=2)

    # -- rejections and quarantine ------------------------------------------------------------------

    def reject(self, reason: str, device: str | None, detail: str) -> None:
        """Count and log a rejection; quarantine a device with ``validation.quarantine_after`` offences outstanding.
        ``detail`` may quote what the device sent: it is cut to :data:`MAX_DETAIL_CHARS` for the log and the
        console (the CLIs' log format escapes its control characters)."""
        if len(detail) > MAX_DETAIL_CHARS:
            detail = f"{detail[:MAX_DETAIL_CHARS]}... ({len(detail) - MAX_DETAIL_CHARS} more characters)"
        self.rejections[reason] += 1
        self.telemetry.counters.rejections.labels(reason=label_value(reason)).inc()
        suffix = self.lines.take(device, "rejected")
        if suffix is not None:
            self.telemetry.event("rejected", device, f"{reason}: {detail}")
            logger.warning("rejected message from %s: %s: %s%s", device or "?", reason, detail, suffix)
        else:  # one device's flood must not flood the log: counted, and said with its next line
            logger.debug("rejected message from %s: %s: %s", device or "?", reason, detail)
        info = self.devices.get(device) if device else None
        if info is None:
            return
        info["rejected"] = info.get("rejected", 0) + 1
        reasons = info.setdefault("rejection_reasons", {})
        reasons[reason] = reasons.get(reason, 0) + 1
        info["last_rejection"] = {"reason": reason, "detail": detail[:300], "time": time.time()}
        if reason in NOT_OFFENCES:
            return
        self.offences[device] += 1
        v = self.cfg.validation
        if self.offences[device] >= v.quarantine_after and not self.quarantined(device):
            info["quarantined_until"] = time.time() + v.quarantine_s
            info["quarantines"] = info.get("quarantines", 0) + 1
            info["quarantine_cause"] = {"reason": reason, "detail": detail[:300], "time": time.time(),
                                        "after": v.quarantine_after}
            self.offences[device] = 0
            self.telemetry.counters.quarantines.inc()
            self.telemetry.event("quarantined", device, f"for {v.quarantine_s:.0f} s after {v.quarantine_after} "
                                                        f"rejected messages in a row (last: {reason}: {detail})")
            logger.error("%s quarantined for %.0fs after %d consecutive rejected messages (last: %s)", device,
                         v.quarantine_s, v.quarantine_after, reason)

    def accepted(self, device: str) -> None:
        """A transfer from ``device`` was accepted: one offence fewer outstanding (not all of them: four bad
        messages and one good one, over and over, would never reach quarantine)."""
        if self.offences[device] > 0:
            self.offences[device] -= 1

    def quarantined(self, device: str) -> bool:
        until = self.devices.get(device, {}).get("quarantined_until")
        if until is None:
            return False
        if time.time() < until:
            return True
        self.devices[device].pop("quarantined_until", None)
        logger.warning("%s released from quarantine", device)
        self.telemetry.event("released", device, "quarantine over")
        return False

    # -- presence -----------------------------------------------------------------------------------

    def register(self, device: str, facts: dict, recipe: dict) -> bool:
        """Record a (re-)registration: checked device ``facts`` and the ``recipe`` fields the runtime sent it
        (model, trainer, batch_size, epochs, model_kwargs, optimizer, codec). Returns whether it was known."""
        known = device in self.devices
        if known and facts.get("program") and not self.devices[device].get("program"):
            self.devices[device].update(facts)  # the same process, now running the edge program it was sent
            self.log(device, "program", "%s runs edge program %s (engine %s)", device, facts["program"][:12],
                     facts.get("engine"))
            return True
        info = self.devices.setdefault(device, {"bytes_up": 0, "bytes_resent": 0, "bytes_rejected": 0, "bytes_down": 0,
                                                "raw_fp32_bytes": 0, "rounds": [], "rejected": 0})
        info.pop("offline_since", None)
        info.update(online=True, registered_at=time.time(), **facts, **recipe)
        self.log(device, "registered", "%s %sregistered: %s samples, model %s, trainer %s, profile %s", device,
                 "re-" if known else "", facts["train_samples"], recipe.get("model"), recipe.get("trainer"),
                 facts.get("profile"))
        self.telemetry.event("re-registered" if known else "registered", device,  # the feed bounds its own
                             f"{facts['train_samples']} train samples, engine {facts.get('engine')}, "
                             f"profile {facts.get('profile')}")
        return known

    def on_status(self, device: str, data: dict) -> None:
        if device not in self.devices:
            return
        info = self.devices[device]
        was = info.get("online")
        info["online"] = bool(data.get("online"))
        if info["online"]:
            info.pop("offline_since", None)
        else:
            info["offline_since"] = time.time()
        self.log(device, "status", "%s is %s", device, "online" if info["online"] else "offline")
        if was != info["online"]:  # the feed bounds (and counts) a device's events itself
            self.telemetry.event("online" if info["online"] else "offline", device)

    def on_heartbeat(self, device: str, data: dict) -> None:
        if device not in self.devices:
            raise Rejected("unknown_device", "heartbeat before registration")
        info = self.devices[device]
        info["online"] = True
        info["last_heartbeat"] = time.time()
        info["heartbeat"] = heartbeat_fields(data)

    def names(self) -> list[str]:
        return sorted(self.devices)

    def reachable(self) -> list[str]:
        """Devices a round still waits for: online, or offline for less than ``offline_grace_s`` (a restart),
        and not quarantined (whatever a quarantined device sends is ignored: waiting for it would let one
        misbehaving device hold every round to its deadline)."""
        now = time.time()
        return [d for d in self.in_good_standing() if self.devices[d].get("online")
                or now - self.devices[d].get("offline_since", 0.0) < self.cfg.offline_grace_s]

    def in_good_standing(self) -> list[str]:
        """Registered devices that are not quarantined (what a round's quorum counts)."""
        return [d for d in self.names() if not self.quarantined(d)]

    def wait_for_devices(self, pump, stop) -> None:
        """Until ``expected_devices`` are online, or ``min_devices`` are and ``registration_timeout_s`` passed
        (``pump()``: handle queued messages; ``stop``: an Event). Online: registered (or heard from) since this
        start; a resumed run waits for its devices to come back rather than opening a round nobody hears."""
        cfg = self.cfg
        start, want = time.monotonic(), cfg.expected_devices
        last_said = start
        while not stop.is_set():
            pump()
            online = [d for d in self.in_good_standing() if self.devices[d].get("online")]
            n, elapsed = len(online), time.monotonic() - start
            if (want is not None and n >= want) or (n >= cfg.min_devices and elapsed >= cfg.registration_timeout_s):
                logger.info("%d devices online: %s", n, ", ".join(online))
                return
            if time.monotonic() - last_said >= 30:
                last_said = time.monotonic()
                wait = f"{want} expected" if want else f"{cfg.min_devices} needed"
                logger.info("waiting for devices: %d online (%s) of %s; %s", n, ", ".join(online) or "none", wait,
                            f"starting with {cfg.min_devices} or more after registration_timeout_s="
                            f"{cfg.registration_timeout_s:g} s ({max(0, cfg.registration_timeout_s - elapsed):.0f} s left)")

    # -- durable state ------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"devices": self.devices, "rejections": dict(self.rejections)}

    def restore(self, state: dict) -> None:
        self.devices = state.get("devices", {})
        for info in self.devices.values():
            info["online"] = False  # until they say otherwise
            info.setdefault("bytes_resent", 0)  # state from before re-sent and rejected bytes were told apart
            info.setdefault("bytes_rejected", 0)
        self.rejections = Counter(state.get("rejections", {}))
