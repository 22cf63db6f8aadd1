//! Addresses and plain HTTP for tests: a free `ip:port` on a loopback address, and a GET that
//! returns the whole response.

use std::net::SocketAddr;

/// A free `ip:port` on `ip` (bind port 0, then release it).
pub fn try_free_addr(ip: &str) -> std::io::Result<String> {
    let listener = std::net::TcpListener::bind(format!("{ip}:0"))?;
    Ok(listener.local_addr()?.to_string())
}

/// [`try_free_addr`], failing the test if `ip` cannot be bound.
pub fn free_addr(ip: &str) -> String {
    try_free_addr(ip).unwrap_or_else(|error| panic!("bind {ip}:0: {error}"))
}

/// A plain HTTP/1.1 GET of `path` at `addr`; the whole response (status line, headers, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: auditor\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_address_can_be_bound_on_the_asked_ip() {
        let addr = free_addr("127.0.0.9");
        assert!(addr.starts_with("127.0.0.9:"), "{addr}");
        std::net::TcpListener::bind(&addr).expect("still free");
    }
}
