//! `watch`: a GraphQL subscription client for the terminal. Subscribes to live
//! revenue over `graphql-transport-ws` (sending the API key on the upgrade, which
//! browsers cannot) and prints each update as it arrives.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub struct Settings {
    pub serving_url: String,
    pub key: String,
    pub query: String,
    /// Stop after this many updates.
    pub updates: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// Prints every update (one JSON line each, with the time since subscribing);
/// returns how many arrived.
pub async fn run(s: &Settings) -> anyhow::Result<u64> {
    let url = format!(
        "{}/graphql/ws",
        s.serving_url
            .trim_end_matches('/')
            .replacen("http", "ws", 1)
    );
    let mut request = url.into_client_request()?;
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "graphql-transport-ws".parse()?);
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", s.key).parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    ws.send(Message::text(r#"{"type":"connection_init","payload":{}}"#))
        .await?;
    let subscribe = serde_json::json!({
        "id": "1", "type": "subscribe", "payload": { "query": s.query }
    });
    ws.send(Message::text(subscribe.to_string())).await?;
    let started = Instant::now();
    let deadline = s.duration.map(|d| started + d);
    let mut updates = 0;
    loop {
        if s.updates.is_some_and(|n| updates >= n) {
            break;
        }
        let next = match deadline {
            Some(at) => match tokio::time::timeout_at(at.into(), ws.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => ws.next().await,
        };
        let Some(message) = next else { break };
        let Message::Text(text) = message? else {
            continue;
        };
        let value: serde_json::Value = serde_json::from_str(&text)?;
        match value["type"].as_str() {
            Some("next") => {
                updates += 1;
                let line = serde_json::json!({
                    "after_ms": started.elapsed().as_millis() as u64,
                    "data": value["payload"]["data"],
                    "errors": value["payload"]["errors"],
                });
                println!("{line}");
            }
            Some("error") => anyhow::bail!("the subscription failed: {}", value["payload"]),
            Some("complete") => break,
            _ => {}
        }
    }
    drop(ws.close(None).await);
    Ok(updates)
}
