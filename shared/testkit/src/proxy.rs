//! A TCP proxy on loopback in front of a server, which can be made slow.

use std::time::Duration;

/// A TCP proxy on loopback in front of a server, which can be made slow: every
/// chunk read from either side waits `delay` before it is forwarded.
pub struct SlowProxy {
    pub port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl SlowProxy {
    pub async fn start(upstream_port: u16) -> SlowProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let delay_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let delay = delay_ms.clone();
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let delay = delay.clone();
                tokio::spawn(async move {
                    // Upstream down: the client sees its connection closed.
                    let Ok(server) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                    else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let pipe =
                        |mut from: tokio::net::tcp::OwnedReadHalf,
                         mut to: tokio::net::tcp::OwnedWriteHalf| {
                            let delay = delay.clone();
                            async move {
                                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                                let mut buf = vec![0; 64 * 1024];
                                while let Ok(n @ 1..) = from.read(&mut buf).await {
                                    let ms = delay.load(Ordering::Relaxed);
                                    if ms > 0 {
                                        tokio::time::sleep(Duration::from_millis(ms)).await;
                                    }
                                    if to.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                                drop(to.shutdown().await);
                            }
                        };
                    tokio::join!(
                        pipe(client_read, server_write),
                        pipe(server_read, client_write)
                    );
                });
            }
        });
        SlowProxy {
            port,
            delay_ms,
            accept,
        }
    }

    /// Every forwarded chunk waits this long from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms.store(
            delay.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
