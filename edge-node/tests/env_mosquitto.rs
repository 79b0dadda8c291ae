//! Smoke test of the test environment's mosquitto: a QoS 1 message published
//! by one rumqttc client reaches another that subscribed to its topic.

use std::time::Duration;

use outpost_sync::test_utils::{env_value, unique_name};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};

fn client(id: &str, addr: &str) -> (AsyncClient, EventLoop) {
    let (host, port) = addr.rsplit_once(':').expect("host:port");
    let mut options = MqttOptions::new(id, host, port.parse().expect("port"));
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    // The broker sets TCP_NODELAY; so do its clients.
    let mut network = eventloop.network_options();
    network.set_tcp_nodelay(true);
    eventloop.set_network_options(network);
    (client, eventloop)
}

#[tokio::test]
async fn message_crosses_mosquitto() {
    let addr = env_value("OUTPOST_MQTT_ADDR").expect("test environment");
    let topic = format!("outpost/smoke/{}", unique_name("t"));

    let (subscriber, mut sub_loop) = client(&unique_name("sub"), &addr);
    subscriber
        .subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    // Drive the subscriber until the broker acknowledged the subscription.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::SubAck(_)) =
                sub_loop.poll().await.expect("subscriber connection")
            {
                break;
            }
        }
    })
    .await
    .expect("SUBACK within 10 s");

    let (publisher, mut pub_loop) = client(&unique_name("pub"), &addr);
    publisher
        .publish(
            &topic,
            QoS::AtLeastOnce,
            false,
            b"hello-from-outpost".to_vec(),
        )
        .await
        .expect("publish");
    let publisher_task = tokio::spawn(async move {
        loop {
            if pub_loop.poll().await.is_err() {
                break;
            }
        }
    });

    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) =
                sub_loop.poll().await.expect("subscriber connection")
            {
                break p;
            }
        }
    })
    .await
    .expect("message within 10 s");
    assert_eq!(received.topic, topic);
    assert_eq!(&received.payload[..], b"hello-from-outpost");
    publisher_task.abort();
}
