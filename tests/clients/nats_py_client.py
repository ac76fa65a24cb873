"""An external Switchyard client written with nats-py, as a publisher in another language would.

Creates a counter, adds to it, provokes a typed error, reads the counter back, and queues a
fire-and-forget command through JetStream; then registers a switch pod, reserves a meeting
point for a machine and reads it back. Prints one JSON line per reply: {"body", "headers"}.

Usage: python nats_py_client.py NATS_URL
"""

import asyncio
import json
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)

    async def call(route: str, body: dict, headers: dict | None = None) -> None:
        reply = await nc.request(
            f"sy.api.{route}", json.dumps(body).encode(), timeout=5, headers=headers
        )
        print(json.dumps({"body": json.loads(reply.data), "headers": dict(reply.headers or {})}))

    await call("counter.create", {"id": "py/counter.1", "limit": 5, "command_id": "py-create"})
    await call("counter.add", {"id": "py/counter.1", "amount": 2}, {"Switchyard-Principal": "nats-py"})
    await call("counter.add", {"id": "py/counter.1", "amount": 50})
    await call("counter.get", {"id": "py/counter.1"})

    js = nc.jetstream()
    ack = await js.publish(
        "sy.cmd.counter.add",
        json.dumps({"id": "py/counter.1", "amount": 1, "command_id": "py-ff-1"}).encode(),
    )
    print(json.dumps({"queued": {"stream": ack.stream, "seq": ack.seq}}))

    await call("pod.add", {"pod": "py-pod-0"})
    await call(
        "meeting_point.reserve",
        {"machine": "skia-rpi-001.example.com", "username": "chrome-bot"},
    )
    await call("meeting_point.get", {"machine": "skia-rpi-001.example.com"})
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
