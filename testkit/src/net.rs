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

/// An HTTP response read whole: status code, headers (names lower-cased) and body bytes.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body (`Content-Length` framed, or everything until the server closed).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A plain HTTP/1.1 GET of `path` at `addr` with extra `headers`, read whole.
pub async fn http_get_bytes(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let split = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut body = response[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if let Some(length) = response
        .header("content-length")
        .and_then(|length| length.parse::<usize>().ok())
    {
        body.truncate(length);
    }
    HttpResponse { body, ..response }
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
