"""A lesson portal written with nats-py: creates a live session, requests a lesson and waits
for READY through the lesson's event subject (no polling), reads how to reach it, then kills
it and waits for `livelesson.deleted`. Events are read from their headers
(`Switchyard-Event-Type`), so the payload's encoding does not matter. Prints one JSON line per
step.

Usage: python nats_py_lessons.py NATS_URL LESSON
"""

import asyncio
import json
import sys

import nats


async def main(url: str, lesson: str) -> None:
    nc = await nats.connect(url)

    async def call(route: str, body: dict) -> dict:
        reply = await nc.request(f"sy.api.{route}", json.dumps(body).encode(), timeout=10)
        answer = json.loads(reply.data)
        if "error" in answer:
            raise SystemExit(f"{route}: {answer['error']}")
        return answer["result"]

    session = await call("livesession.create", {"source": "203.0.113.7"})
    print(json.dumps({"session": session["id"]}))

    # Subscribed before the request, so no event of the lesson is missed.
    events = await nc.subscribe("sy.evt.livelesson.>")
    requested = await call("lesson.request", {"session": session["id"], "lesson": lesson})
    subject = f"sy.evt.livelesson.{requested['id']}"
    print(json.dumps({"requested": requested}))

    async def until(wanted: str) -> list[str]:
        seen = []
        while True:
            message = await events.next_msg(timeout=60)
            if message.subject != subject:
                continue
            types = (message.headers or {}).get("Switchyard-Event-Type", "").split(",")
            seen.extend(types)
            if wanted in types:
                return seen
            if "livelesson.failed" in types:
                raise SystemExit(f"the lesson failed: {seen}")

    print(json.dumps({"events": await until("livelesson.ready")}))
    view = await call("livelesson.get", {"id": requested["id"]})
    print(json.dumps({"status": view["status"], "ssh": [e.get("ssh") for e in view["endpoints"]]}))
    await call("livelesson.kill", {"id": requested["id"]})
    print(json.dumps({"events": await until("livelesson.deleted")}))
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
