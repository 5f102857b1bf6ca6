//! `shoal tool …`: a built-in workload and client for demos and tests, so
//! that no image or external server is needed.
//!
//! `http-echo` answers every HTTP request (and, with `--udp`, every UDP
//! datagram) with `{"task", "node", "addresses", "client"}`, the task and
//! node coming from the environment the executor gives every task.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Largest request head the echo server reads.
const MAX_HEAD: usize = 16 * 1024;

#[derive(Debug, Subcommand)]
pub enum ToolCmd {
    /// Serve HTTP answering who served each request.
    HttpEcho {
        /// TCP port to listen on.
        #[arg(long, default_value_t = 80)]
        port: u16,
        /// Also answer UDP datagrams on the same port.
        #[arg(long)]
        udp: bool,
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
    },
    /// GET a URL (http:// only) and print the body; fails on errors.
    HttpGet {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// http://HOST:PORT/PATH (HOST an IP address or name).
        url: String,
    },
    /// Accept TCP connections and read them to the end (a throughput sink).
    TcpSink {
        /// TCP port to listen on.
        #[arg(long)]
        port: u16,
    },
    /// Send as fast as possible to a TCP sink for a while; print the rate.
    TcpBlast {
        /// How long, in seconds.
        #[arg(long, default_value_t = 3)]
        seconds: u64,
        /// HOST:PORT of the sink.
        addr: String,
    },
    /// Send one UDP datagram and print the answer.
    UdpSend {
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
        /// Send from this local port (a flow that keeps its source port,
        /// as resolvers and metrics agents do), not a new one.
        #[arg(long, default_value_t = 0)]
        from_port: u16,
        /// HOST:PORT.
        addr: String,
        /// What to send.
        message: String,
    },
}

/// This sandbox's IPv4 addresses, loopback left out (`ip -o -4 addr`).
fn addresses() -> Vec<String> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "-4", "addr", "show"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "inet")?;
            let addr = words.next()?.split('/').next()?.to_owned();
            (!addr.starts_with("127.")).then_some(addr)
        })
        .collect()
}

fn who(client: SocketAddr) -> serde_json::Value {
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let node = match env("SHOAL_NODE_HOSTNAME") {
        n if n.is_empty() => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        n => n,
    };
    json!({
        "task": env("SHOAL_TASK_NAME"),
        "node": node,
        "addresses": addresses(),
        "client": client.to_string(),
    })
}

async fn serve_http(mut stream: TcpStream, client: SocketAddr) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            let msg = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
            return stream.write_all(msg).await;
        }
    }
    let mut body = serde_json::to_vec(&who(client)).unwrap_or_default();
    body.push(b'\n');
    let reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(reply.as_bytes()).await?;
    stream.write_all(&body).await?;
    stream.shutdown().await
}

async fn http_echo(bind: std::net::IpAddr, port: u16, udp: bool) -> anyhow::Result<()> {
    let listener = TcpListener::bind((bind, port))
        .await
        .with_context(|| format!("cannot listen on {bind}:{port}/tcp"))?;
    println!("http-echo listening on {bind}:{port}/tcp");
    if udp {
        let sock = UdpSocket::bind((bind, port))
            .await
            .with_context(|| format!("cannot listen on {bind}:{port}/udp"))?;
        println!("udp echo listening on {bind}:{port}/udp");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let mut answer = who(from);
                answer["echo"] = String::from_utf8_lossy(&buf[..n]).into_owned().into();
                let bytes = serde_json::to_vec(&answer).unwrap_or_default();
                let _ = sock.send_to(&bytes, from).await;
            }
        });
    }
    // SIGTERM ends it: as a container's PID 1 it has no default action,
    // and a stop would otherwise wait out the grace period.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = term.recv() => return Ok(()),
        };
        tokio::spawn(async move {
            let _ = serve_http(stream, client).await;
        });
    }
}

/// Splits `http://HOST[:PORT][/PATH]`.
fn parse_url(url: &str) -> anyhow::Result<(String, u16, String)> {
    let bad = || anyhow!("invalid URL `{url}`: use http://HOST[:PORT]/PATH");
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().map_err(|_| bad())?),
        None => (authority, 80),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host.to_owned(), port, path.to_owned()))
}

/// GET `url`, giving up after `limit`; a timeout says whether the
/// connection was made (and from which local address), or not.
async fn http_get(url: &str, limit: Duration) -> anyhow::Result<String> {
    let (host, port, path) = parse_url(url)?;
    let deadline = tokio::time::Instant::now() + limit;
    let secs = limit.as_secs_f64();
    let mut stream = tokio::time::timeout_at(deadline, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| anyhow!("{url}: no connection within {secs} s"))?
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let from = stream
        .local_addr()
        .map_or_else(|_| "?".into(), |a| a.to_string());
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let mut resp = Vec::new();
    let exchange = async {
        stream.write_all(req.as_bytes()).await?;
        stream.read_to_end(&mut resp).await
    };
    tokio::time::timeout_at(deadline, exchange)
        .await
        .map_err(|_| anyhow!("{url}: connected from {from}, but no answer within {secs} s"))??;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{host}:{port} sent no HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'))
    {
        bail!("{url}: {status}");
    }
    Ok(body.to_owned())
}

async fn udp_send(addr: &str, from_port: u16, message: &str) -> anyhow::Result<String> {
    let target = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("invalid address `{addr}`: use HOST:PORT"))?
        .next()
        .ok_or_else(|| anyhow!("`{addr}` resolves to nothing"))?;
    let sock = UdpSocket::bind(("0.0.0.0", from_port))
        .await
        .with_context(|| format!("cannot send from port {from_port}/udp"))?;
    sock.send_to(message.as_bytes(), target).await?;
    let mut buf = vec![0u8; 65_535];
    let (n, _) = sock.recv_from(&mut buf).await?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

async fn tcp_sink(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("0.0.0.0", port))
        .await
        .with_context(|| format!("cannot listen on port {port}/tcp"))?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
        });
    }
}

async fn tcp_blast(addr: &str, seconds: u64) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let buf = vec![0u8; 256 * 1024];
    let started = std::time::Instant::now();
    let mut sent: u64 = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        stream.write_all(&buf).await?;
        sent += buf.len() as u64;
    }
    stream.shutdown().await?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"bytes": sent, "seconds": secs, "mbit_s": sent as f64 * 8.0 / secs / 1e6})
    );
    Ok(())
}

impl ToolCmd {
    pub async fn exec(self) -> anyhow::Result<()> {
        match self {
            ToolCmd::TcpSink { port } => tcp_sink(port).await,
            ToolCmd::TcpBlast { seconds, addr } => tcp_blast(&addr, seconds).await,
            ToolCmd::HttpEcho { port, udp, bind } => http_echo(bind, port, udp).await,
            ToolCmd::HttpGet { timeout, url } => {
                let body = http_get(&url, Duration::from_secs(timeout)).await?;
                print!("{body}");
                Ok(())
            }
            ToolCmd::UdpSend {
                timeout,
                from_port,
                addr,
                message,
            } => {
                let send = udp_send(&addr, from_port, &message);
                let answer = tokio::time::timeout(Duration::from_secs(timeout), send)
                    .await
                    .map_err(|_| anyhow!("{addr}: no answer within {timeout} s"))??;
                println!("{answer}");
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_are_refused() {
        assert_eq!(
            parse_url("http://10.0.0.2:8080/x").unwrap(),
            ("10.0.0.2".into(), 8080, "/x".into())
        );
        assert_eq!(
            parse_url("http://web").unwrap(),
            ("web".into(), 80, "/".into())
        );
        for bad in ["https://a/", "http://:80/", "http://a:x/", "a:80"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn http_echo_answers_with_the_task_and_the_client() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (s, c) = listener.accept().await.unwrap();
            serve_http(s, c).await.unwrap();
        });
        let body = http_get(&format!("http://127.0.0.1:{port}/"), Duration::from_secs(5))
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{v}"
        );
        assert!(v["addresses"].is_array() && v["node"].is_string(), "{v}");
    }
}
