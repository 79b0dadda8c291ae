"""A Modbus device simulator for Outpost's tests and local fleet, on pymodbus.

It serves one device (unit id 1 by default) with separate coil, discrete
input, holding register and input register blocks, numbered from 0 as on the
wire. Addresses past the blocks answer with an "illegal data address"
exception, which is how tests provoke a device exception.

The register map is the "thermostat" a user sees in the local fleet:
  holding 0      temperature setpoint, INT16 (default 215 = 21.5 C at scale 0.1)
  holding 1      fan speed, UINT16 (default 3)
  holding 2-3    power in watts, FLOAT32 big-endian words (default 1500.5)
  holding 4-5    energy counter, UINT32 (default 0x00010002)
  holding 6-13   name, 16 ASCII bytes "thermo-1"
  holding 14-199 zero, free for tests
  input   0      measured temperature, INT16 (default 204)
  input   1-199  zero
  coils   0      heater on (default True)
  discrete 0     door closed (default True)
"""

import argparse
import asyncio
import logging
import struct

from pymodbus.framer import FramerType
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

BLOCK = 200


def holding_registers() -> list[int]:
    regs = [0] * BLOCK
    regs[0] = 215
    regs[1] = 3
    regs[2], regs[3] = struct.unpack(">HH", struct.pack(">f", 1500.5))
    regs[4], regs[5] = 0x0001, 0x0002
    name = b"thermo-1".ljust(16, b"\0")
    for i in range(8):
        regs[6 + i] = (name[2 * i] << 8) | name[2 * i + 1]
    return regs


def input_registers() -> list[int]:
    regs = [0] * BLOCK
    regs[0] = 204
    return regs


def device(unit: int) -> SimDevice:
    coils = [False] * BLOCK
    coils[0] = True
    discrete = [False] * BLOCK
    discrete[0] = True
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(address=0, values=coils, datatype=DataType.BITS)],
            [SimData(address=0, values=discrete, datatype=DataType.BITS)],
            [SimData(address=0, values=holding_registers(), datatype=DataType.REGISTERS)],
            [SimData(address=0, values=input_registers(), datatype=DataType.REGISTERS)],
        ),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=15020, help="TCP port (default: %(default)s)")
    parser.add_argument("--unit", type=int, default=1, help="unit (slave) id (default: %(default)s)")
    parser.add_argument(
        "--framer",
        choices=["tcp", "rtu"],
        default="tcp",
        help="tcp: Modbus TCP; rtu: RTU frames over a TCP socket (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost") and not args.host.startswith("127."):
        parser.error("the simulator listens on loopback only")
    logging.basicConfig(level=logging.WARNING)
    framer = FramerType.SOCKET if args.framer == "tcp" else FramerType.RTU
    server = ModbusTcpServer(device(args.unit), framer=framer, address=(args.host, args.port))
    print(f"modbus device unit={args.unit} framer={args.framer} on {args.host}:{args.port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
