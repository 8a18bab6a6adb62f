"""Baseline receiver: plain paho, QoS 1, counts bytes until `total` arrived, prints seconds."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    port, topic, total = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    received = 0
    first: float | None = None
    done = threading.Event()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        nonlocal received, first
        first = first or time.perf_counter()
        received += len(msg.payload)
        if received >= total:
            done.set()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, "raw-sub", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_: print("ready", flush=True)
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    done.wait(600)
    print(f"done {time.perf_counter():.6f}", flush=True)
    client.loop_stop()


if __name__ == "__main__":
    main()
