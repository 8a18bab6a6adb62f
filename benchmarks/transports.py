"""How to get an 8 MiB frame from the acquisition program into the agent: the hand-off
alone (no disk), each option between two processes on this machine.

  call    in-process: the agent runs in the acquisition program (a function call)
  uds     Unix socket, `sendall` of the array, `recv_into` a preallocated array (the fast path)
  memfd   shared memory: the client copies the frame into a memfd it passed once
          (SCM_RIGHTS), sends a 8-byte header; the agent reads it in place
  http    HTTP POST (httpx -> uvicorn), the body streamed into a preallocated array

Prints p50 / p99 ms per frame. The fast path's choice is made from these and the
durable write that follows every hand-off (docs/benchmarks.md).

    .venv/bin/python benchmarks/transports.py [--samples 300]
"""

from __future__ import annotations

import argparse
import mmap
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZE = 8 * 1024 * 1024
HEADER = struct.Struct("!II")

SERVER = r"""
import mmap, os, socket, struct, sys
import numpy as np
kind, path = sys.argv[1], sys.argv[2]
SIZE = 8 * 1024 * 1024
if kind == "http":
    import uvicorn
    from fastapi import FastAPI, Request
    app = FastAPI()
    @app.post("/frame")
    async def frame(request: Request) -> dict:
        target = np.empty(SIZE, np.uint8); view = memoryview(target); n = 0
        async for chunk in request.stream():
            view[n:n + len(chunk)] = chunk; n += len(chunk)
        return {"n": n}
    print("ready", flush=True)
    uvicorn.run(app, uds=path, log_level="warning")
    sys.exit()
srv = socket.socket(socket.AF_UNIX); srv.bind(path); srv.listen(); print("ready", flush=True)
conn, _ = srv.accept()
buffer = np.empty(SIZE, np.uint8); view = memoryview(buffer)
shared = None
if kind == "memfd":
    _, fds, _, _ = socket.recv_fds(conn, 16, 1)
    shared = np.frombuffer(mmap.mmap(fds[0], SIZE, prot=mmap.PROT_READ), np.uint8)
while True:
    head = conn.recv(8, socket.MSG_WAITALL)
    if len(head) < 8: break
    if kind == "uds":
        rest = view
        while rest:
            got = conn.recv_into(rest); rest = rest[got:]
        checksum = int(buffer[::4096].sum())   # touch it, as the agent would
    else:
        checksum = int(shared[::4096].sum())
    conn.sendall(b"ok")
"""


def run(kind: str, samples: int, frame: np.ndarray) -> list[float]:
    folder = Path(tempfile.mkdtemp(prefix="tb-transport-"))
    path = str(folder / "s.sock")
    server = subprocess.Popen([sys.executable, "-c", SERVER, kind, path], stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    while not os.path.exists(path):
        time.sleep(0.01)
    times = []
    try:
        if kind == "http":
            import httpx

            with httpx.Client(transport=httpx.HTTPTransport(uds=path), timeout=60) as client:
                for _ in range(samples):
                    t0 = time.perf_counter()
                    client.post("http://agent/frame", content=frame.tobytes()).raise_for_status()
                    times.append(time.perf_counter() - t0)
            return times
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        shared = None
        if kind == "memfd":
            fd = os.memfd_create("frame")
            os.ftruncate(fd, SIZE)
            shared = np.frombuffer(mmap.mmap(fd, SIZE), np.uint8)
            socket.send_fds(sock, [b"x"], [fd])
        raw = frame.reshape(-1).view(np.uint8)
        for _ in range(samples):
            t0 = time.perf_counter()
            if shared is not None:
                np.copyto(shared, raw)
                sock.sendall(HEADER.pack(0, 0))
            else:
                sock.sendall(HEADER.pack(0, SIZE))
                sock.sendall(raw.data)
            assert sock.recv(2, socket.MSG_WAITALL) == b"ok"
            times.append(time.perf_counter() - t0)
        sock.close()
        return times
    finally:
        server.terminate()
        server.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300)
    args = parser.parse_args()
    frame = np.random.default_rng(0).integers(0, 4000, SIZE // 2, dtype=np.uint16)
    print(f"hand-off of an 8 MiB frame, {args.samples} samples, ms per frame")
    print("call   p50   0.0  p99   0.0  (no copy: the array is passed)")
    for kind in ("uds", "memfd", "http"):
        ms = np.array(run(kind, args.samples, frame)) * 1000
        p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
        print(f"{kind:6} p50 {p50:5.1f}  p99 {p99:5.1f}  ({SIZE / np.median(ms) / 1e3:.0f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
