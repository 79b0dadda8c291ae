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
`--extra-nodes N` adds ns=2;s=v0 .. v<N-1> (Doubles) for benchmarks.

Security policy None by default; `--security basic256sha256` serves
Basic256Sha256 with SignAndEncrypt only, with a self-signed server
certificate generated into `--cert-dir` when none is there.
`--fault-hooks` adds ns=2;s=drop_subscriptions, a Boolean that, when written
true, makes the server forget every subscription without telling its clients
(a subscription that goes silent, as after some server restarts).
"""

import argparse
import asyncio
import logging

from pathlib import Path

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
    parser.add_argument(
        "--security",
        choices=["none", "basic256sha256"],
        default="none",
        help="security policy served (default: %(default)s)",
    )
    parser.add_argument(
        "--cert-dir",
        default=None,
        help="folder of the server certificate (server-cert.der, server-key.pem), generated if missing; "
        "required with --security basic256sha256 (default: none)",
    )
    parser.add_argument(
        "--extra-nodes",
        type=int,
        default=0,
        help="also serve ns=2;s=v0 .. v<N-1>, Doubles equal to their index, for benchmarks (default: %(default)s)",
    )
    parser.add_argument(
        "--fault-hooks",
        action="store_true",
        help="add ns=2;s=drop_subscriptions to make the server forget its subscriptions (default: off)",
    )
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.host.startswith("127."):
        parser.error("the simulator listens on loopback only")
    logging.basicConfig(level=logging.WARNING)

    server = Server()
    await server.init()
    endpoint = f"opc.tcp://{args.host}:{args.port}/outpost/"
    server.set_endpoint(endpoint)
    server.set_server_name("Outpost OPC UA device simulator")
    if args.security == "none":
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    else:
        if not args.cert_dir:
            parser.error("--security basic256sha256 needs --cert-dir")
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        cert_dir = Path(args.cert_dir)
        cert_dir.mkdir(parents=True, exist_ok=True)
        cert, key = cert_dir / "server-cert.der", cert_dir / "server-key.pem"
        await setup_self_signed_certificate(
            key,
            cert,
            "urn:outpost:sim:opcua",
            args.host,
            [ExtendedKeyUsageOID.SERVER_AUTH],
            {"commonName": "Outpost OPC UA device simulator"},
        )
        server.set_server_name("Outpost OPC UA device simulator")
        await server.set_application_uri("urn:outpost:sim:opcua")
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
    idx = await server.register_namespace("urn:outpost:sim")
    device = await server.nodes.objects.add_object(ua.NodeId("device", idx), "device")
    for name, value, vtype in VARIABLES:
        var = await device.add_variable(ua.NodeId(name, idx), name, ua.Variant(value, vtype))
        await var.set_writable()
    for i in range(args.extra_nodes):
        await device.add_variable(ua.NodeId(f"v{i}", idx), f"v{i}", ua.Variant(float(i), ua.VariantType.Double))
    counter = await device.add_variable(ua.NodeId("counter", idx), "counter", ua.Variant(0, ua.VariantType.Int64))
    drop = None
    if args.fault_hooks:
        drop = await device.add_variable(ua.NodeId("drop_subscriptions", idx), "drop_subscriptions", False)
        await drop.set_writable()
    async with server:
        print(f"opcua device on {endpoint} namespace index {idx}", flush=True)
        n = 0
        while True:
            for _ in range(10):
                await asyncio.sleep(0.1)
                if drop is not None and await drop.read_value():
                    service = server.iserver.subscription_service
                    # Forget them without a word to the clients.
                    for sub in list(service.subscriptions.values()):
                        await sub.stop()
                    service.subscriptions.clear()
                    await drop.write_value(False)
            n += 1
            await counter.write_value(ua.Variant(n, ua.VariantType.Int64))


if __name__ == "__main__":
    asyncio.run(main())
