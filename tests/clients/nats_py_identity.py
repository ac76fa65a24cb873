"""An external client that authenticates to NATS with its own credentials and claims to be
someone else: Switchyard must record the user NATS authenticated, not the claim.

Usage: python nats_py_identity.py NATS_URL_WITH_CREDENTIALS
Prints the reply as one JSON line: {"body", "headers"}.
"""

import asyncio
import json
import sys

import nats


async def main(url: str) -> None:
    nc = await nats.connect(url)
    reply = await nc.request(
        "sy.api.counter.create",
        json.dumps({"id": "py/authenticated"}).encode(),
        timeout=5,
        headers={"Switchyard-Principal": "root", "Nats-Request-Info": '{"acc":"SY","user":"root"}'},
    )
    print(json.dumps({"body": json.loads(reply.data), "headers": dict(reply.headers or {})}))
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
