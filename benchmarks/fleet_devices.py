"""Simulated devices for benchmarks/fleet.py: paho + the protocol package, one MQTT client per
device, one image each, obeying the server's window (`credit` acks) like the edge publisher.

    python benchmarks/fleet_devices.py --port P --devices N --tiles K --out result.json

Prints nothing; writes per-device timings (first publish, close, complete) as JSON.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tilebridge_protocol.framing import encode_tile, tile_digest
from tilebridge_protocol.keys import TileKey
from tilebridge_protocol.messages import (
    CloseManifest,
    CreditAck,
    ErrorAck,
    ImageAck,
    OpenManifest,
    PixelSize,
    StagePosition,
    TileAck,
    TileDigest,
    TileState,
    decode_ack,
)
from tilebridge_protocol.reasons import ReasonCode
from tilebridge_protocol.topics import DeviceTopic, device_topic
from tilebridge_runtime.mqtt import connect_properties

TILE = 1024  # 1024 x 1024 uint16: 2 MiB tiles
OWN_CAP = 64 * 1024 * 1024  # the edge's default inflight_bytes
INITIAL_WINDOW = 8 * 1024 * 1024  # the edge's default initial_window_bytes
RESEND_S = 30.0


class Device(threading.Thread):
    def __init__(self, name: str, port: int, tiles: int, start: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.device, self.port, self.start_gate = name, port, start
        self.manifest = OpenManifest(
            image_id=uuid.uuid4(), experiment="fleet", project="bench", dataset="fleet",
            image_name=name, tile_width=TILE, tile_height=TILE, dtype="uint16",
            positions=tuple(StagePosition(index=i, x_um=i * 100.0, y_um=0) for i in range(tiles)),
            pixel_size=PixelSize(x_um=1, y_um=1), acquired_at=datetime.now(UTC),
        )  # fmt: skip
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        self.data = rng.integers(0, 4096, (TILE, TILE), dtype="<u2").tobytes()
        self.digest = tile_digest(self.data)
        self.window = INITIAL_WINDOW
        self.inflight: dict[TileKey, float] = {}
        self.committed: set[TileKey] = set()
        self.cond = threading.Condition()
        self.times: dict[str, float] = {}
        self.windows: list[int] = []
        self.open_again = False
        self.close_again = False
        self.retransmits = 0
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{name}", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(32)
        self.client.max_queued_messages_set(64)
        self.client.on_message = self._message
        self.client.on_connect = lambda c, *_: c.subscribe(device_topic(name, DeviceTopic.ACK), 1)

    def _message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        ack = decode_ack(bytes(msg.payload))
        with self.cond:
            if isinstance(ack, CreditAck):
                self.window = min(OWN_CAP, ack.window_bytes)
                self.windows.append(ack.window_bytes)
            elif isinstance(ack, TileAck) and ack.state is TileState.COMMITTED:
                self.inflight.pop(ack.tile, None)
                self.committed.add(ack.tile)
            elif isinstance(ack, TileAck) and ack.tile in self.inflight:
                # As the edge does: a chunk that overtook its open (another instance got the
                # open) is answered unknown_image: send the open again, then the tile.
                self.open_again = ack.reason is ReasonCode.UNKNOWN_IMAGE
                self.inflight[ack.tile] = float("-inf")
                self.retransmits += 1
            elif isinstance(ack, ImageAck):
                self.times.setdefault("complete", time.time())
            elif isinstance(ack, ErrorAck) and ack.reason is ReasonCode.UNKNOWN_IMAGE:
                self.open_again = True  # as the edge does: the open, then the close again
                self.close_again = ack.topic.endswith("/close")
            self.cond.notify_all()

    def _publish(self, kind: DeviceTopic, payload: bytes) -> None:
        while True:
            info = self.client.publish(device_topic(self.device, kind), payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_QUEUE_SIZE:
                return
            time.sleep(0.002)  # paho's queue is full: the broker is slow to PUBACK

    def _send_tile(self, key: TileKey) -> None:
        for chunk in encode_tile(self.manifest.image_id, key, self.data, digest=self.digest):
            self._publish(DeviceTopic.CHUNK, chunk)

    def run(self) -> None:
        self.client.connect("127.0.0.1", self.port, clean_start=False,
                            properties=connect_properties())  # fmt: skip
        self.client.loop_start()
        self.start_gate.wait()
        self.times["first"] = time.time()
        self._publish(DeviceTopic.OPEN, self.manifest.to_bytes())
        keys = self.manifest.tile_keys()
        for key in keys:
            with self.cond:
                while self.inflight and len(self.inflight) * len(self.data) >= self.window:
                    self.cond.wait(0.05)
                    self._resend_due()
                self.inflight[key] = time.monotonic()
            self._send_tile(key)
        digests = tuple(TileDigest(tile=k, digest=self.digest.hex()) for k in keys)
        close = CloseManifest(image_id=self.manifest.image_id, tile_count=len(keys),
                              digests=digests)  # fmt: skip
        self.times["close"] = time.time()
        self._publish(DeviceTopic.CLOSE, close.to_bytes())
        sent_close = time.monotonic()
        with self.cond:
            while "complete" not in self.times:
                self.cond.wait(0.05)
                self._resend_due()
                if self.close_again or time.monotonic() - sent_close > RESEND_S:
                    self.close_again = False
                    self._publish(DeviceTopic.CLOSE, close.to_bytes())
                    sent_close = time.monotonic()
        self.client.loop_stop()
        self.client.disconnect()

    def _resend_due(self) -> None:
        now = time.monotonic()
        if self.open_again:
            self.open_again = False
            self._publish(DeviceTopic.OPEN, self.manifest.to_bytes())
        for key, sent in list(self.inflight.items()):
            if now - sent > RESEND_S:
                self.inflight[key] = now
                self._send_tile(key)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--tiles", type=int, required=True)
    parser.add_argument("--prefix", default="sim")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    gate = threading.Event()
    devices = [
        Device(f"{args.prefix}-{n}", args.port, args.tiles, gate) for n in range(args.devices)
    ]
    for device in devices:
        device.start()
    time.sleep(1.0)  # every client connected and subscribed
    gate.set()
    deadline = time.monotonic() + args.timeout
    for device in devices:
        device.join(max(0.0, deadline - time.monotonic()))
    cpu = time.process_time()  # the whole fleet's CPU, reported on the first device's row
    result = [
        {"device": d.device, "tile_bytes": len(d.data), "tiles": args.tiles, **d.times,
         "windows": d.windows[-3:], "retransmits": d.retransmits,
         "cpu_s": cpu if n == 0 else 0.0}
        for n, d in enumerate(devices)
    ]  # fmt: skip
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
