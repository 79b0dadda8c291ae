//! Smoke test of the test environment's pymodbus device: registers read over
//! Modbus TCP, and over RTU framing on a TCP socket, with tokio-modbus.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::net::SocketAddr;

use outpost_sync::test_utils::env_value;
use tokio_modbus::prelude::*;

fn addr(key: &str) -> SocketAddr {
    env_value(key)
        .expect("test environment")
        .parse()
        .expect("socket address")
}

#[tokio::test]
async fn pymodbus_answers_register_reads() {
    let mut ctx = tcp::connect_slave(addr("OUTPOST_MODBUS_ADDR"), Slave(1))
        .await
        .expect("connect");
    let regs = ctx
        .read_holding_registers(0, 2)
        .await
        .expect("transport")
        .expect("no exception");
    assert_eq!(
        regs,
        vec![215, 3],
        "setpoint and fan speed of the simulated thermostat"
    );
    let inputs = ctx
        .read_input_registers(0, 1)
        .await
        .expect("transport")
        .expect("no exception");
    assert_eq!(inputs, vec![204]);
    let coils = ctx
        .read_coils(0, 1)
        .await
        .expect("transport")
        .expect("no exception");
    assert_eq!(coils, vec![true]);
    // Past the register map the device answers with an exception, not silence.
    let past = ctx.read_holding_registers(250, 1).await.expect("transport");
    assert_eq!(past, Err(ExceptionCode::IllegalDataAddress));
    ctx.disconnect().await.expect("disconnect");
}

#[tokio::test]
async fn pymodbus_answers_over_rtu_framing() {
    let stream = tokio::net::TcpStream::connect(addr("OUTPOST_MODBUS_RTU_ADDR"))
        .await
        .expect("connect");
    let mut ctx = rtu::attach_slave(stream, Slave(1));
    let regs = ctx
        .read_holding_registers(4, 2)
        .await
        .expect("transport")
        .expect("no exception");
    assert_eq!(regs, vec![0x0001, 0x0002]);
}
