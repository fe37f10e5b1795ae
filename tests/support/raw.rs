//! HTTP/1.1 over a bare socket, for checks a well-behaved client hides: how a response
//! ended on the wire, what a slow or silent client is allowed to hold.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sent, and whether it closed the connection (rather than the
/// read timing out).
pub struct Exchange {
    pub bytes: Vec<u8>,
    pub closed: bool,
}

impl Exchange {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    pub fn head(&self) -> String {
        let text = self.text();
        text.split("\r\n\r\n").next().unwrap_or("").to_string()
    }

    /// The chunked body decoded, and whether it ended with the zero-length last chunk.
    pub fn chunked_body(&self) -> (Vec<u8>, bool) {
        let start = self.bytes.windows(4).position(|w| w == b"\r\n\r\n").map_or(self.bytes.len(), |p| p + 4);
        let mut rest = &self.bytes[start..];
        let mut body = Vec::new();
        loop {
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else { return (body, false) };
            let size_text = String::from_utf8_lossy(&rest[..eol]);
            let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16) else {
                return (body, false);
            };
            rest = &rest[eol + 2..];
            if size == 0 {
                return (body, rest.starts_with(b"\r\n"));
            }
            if rest.len() < size + 2 {
                body.extend_from_slice(&rest[..rest.len().min(size)]);
                return (body, false);
            }
            body.extend_from_slice(&rest[..size]);
            rest = &rest[size + 2..];
        }
    }
}

pub fn post_request(path: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Sends `request` on a new connection and reads until the server closes it or `within`
/// passes.
pub async fn exchange(url: &str, request: &str, within: Duration) -> Exchange {
    let mut conn = connect(url).await;
    conn.write_all(request.as_bytes()).await.expect("send request");
    read_until_closed(&mut conn, within).await
}

pub async fn connect(url: &str) -> TcpStream {
    let addr = url.trim_start_matches("http://");
    TcpStream::connect(addr).await.expect("connect")
}

pub async fn read_until_closed(conn: &mut TcpStream, within: Duration) -> Exchange {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return Exchange { bytes, closed: false },
            Ok(Ok(0)) | Ok(Err(_)) => return Exchange { bytes, closed: true },
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    }
}
