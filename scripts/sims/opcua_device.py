"""An OPC UA device simulator for Outpost's tests and local fleet, on asyncua.

It serves, under the namespace "urn:outpost:sim" (index 2 on a fresh server),
one writable variable of each data type a KubeEdge device property can have:
  ns=2;s=int       Int32     default 42
  ns=2;s=float     Float     default 1.5
  ns=2;s=double    Double    default 21.5
  ns=2;s=string    String    default "thermo-1"
  ns=2;s=boolean   Boolean   default True
  ns=2;s=bytes     ByteString default b"\x01\x02"
and ns=2;s=counter, an Int64 that counts up once a second (for subscriptions).
Security policy None only; tests that need signing start their own server.
"""

import argparse
import asyncio
import logging

from asyncua import Server, ua

VARIABLES = [
    ("int", 42, ua.VariantType.Int32),
    ("float", 1.5, ua.VariantType.Float),
    ("double", 21.5, ua.VariantType.Double),
    ("string", "thermo-1", ua.VariantType.String),
    ("boolean", True, ua.VariantType.Boolean),
    ("bytes", b"\x01\x02", ua.VariantType.ByteString),
]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=14840, help="TCP port (default: %(default)s)")
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.host.startswith("127."):
        parser.error("the simulator listens on loopback only")
    logging.basicConfig(level=logging.WARNING)

    server = Server()
    await server.init()
    endpoint = f"opc.tcp://{args.host}:{args.port}/outpost/"
    server.set_endpoint(endpoint)
    server.set_server_name("Outpost OPC UA device simulator")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace("urn:outpost:sim")
    device = await server.nodes.objects.add_object(ua.NodeId("device", idx), "device")
    for name, value, vtype in VARIABLES:
        var = await device.add_variable(ua.NodeId(name, idx), name, ua.Variant(value, vtype))
        await var.set_writable()
    counter = await device.add_variable(ua.NodeId("counter", idx), "counter", ua.Variant(0, ua.VariantType.Int64))
    async with server:
        print(f"opcua device on {endpoint} namespace index {idx}", flush=True)
        n = 0
        while True:
            await asyncio.sleep(1)
            n += 1
            await counter.write_value(ua.Variant(n, ua.VariantType.Int64))


if __name__ == "__main__":
    asyncio.run(main())
