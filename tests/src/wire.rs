//! Talking to an OpenAI endpoint the way a client would, to check what it
//! sends on the wire: streamed answers read as SSE, and raw sockets for
//! clients that misbehave.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// A streamed chat completion as it arrived.
#[derive(Debug, Clone, Default)]
pub struct SseAnswer {
    /// The content deltas (or a completion's text chunks) joined.
    pub text: String,
    /// The finish reason, if a chunk carried one.
    pub finish_reason: Option<String>,
    /// `error` objects sent inside the stream.
    pub errors: Vec<Value>,
    /// Whether the stream ended with `data: [DONE]`.
    pub done: bool,
}

impl SseAnswer {
    /// Parses a whole SSE body.
    pub fn parse(body: &str) -> Self {
        let mut answer = Self::default();
        for data in body.lines().filter_map(|line| line.strip_prefix("data: ")) {
            if data == "[DONE]" {
                answer.done = true;
                continue;
            }
            let Ok(chunk) = serde_json::from_str::<Value>(data) else {
                answer
                    .errors
                    .push(Value::String(format!("not JSON: {data}")));
                continue;
            };
            if let Some(error) = chunk.get("error") {
                answer.errors.push(error.clone());
                continue;
            }
            // A chat chunk's delta, or a legacy completion chunk's text.
            let choice = &chunk["choices"][0];
            if let Some(text) = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
            {
                answer.text.push_str(text);
            }
            if let Some(reason) = chunk["choices"][0]["finish_reason"].as_str() {
                answer.finish_reason = Some(reason.to_owned());
            }
        }
        answer
    }

    /// Whether this is a whole, well-formed answer: text, a finish reason,
    /// no error, and `[DONE]`.
    pub fn is_well_formed(&self) -> bool {
        !self.text.is_empty() && self.finish_reason.is_some() && self.errors.is_empty() && self.done
    }
}

/// A chat request body.
pub fn chat_body(prompt: &str, max_tokens: u32, stream: bool) -> Value {
    serde_json::json!({
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// POSTs a streamed chat request and reads the whole SSE body, within `timeout`.
pub async fn stream_chat(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    timeout: Duration,
) -> Result<SseAnswer, String> {
    let exchange = async {
        let response = http
            .post(url)
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| format!("reading: {e}"))?;
        if !status.is_success() {
            return Err(format!("HTTP {status}: {text}"));
        }
        Ok(SseAnswer::parse(&text))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// POSTs a streamed chat request, reads until the first content delta, then
/// drops the connection: a client that goes away mid-answer.
pub async fn stream_then_hang_up(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    timeout: Duration,
) -> Result<(), String> {
    let exchange = async {
        let response = http
            .post(url)
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .map_err(|e| format!("sending: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        let mut bytes = response.bytes_stream();
        let mut seen = Vec::new();
        while let Some(chunk) = bytes.next().await {
            seen.extend_from_slice(&chunk.map_err(|e| format!("reading: {e}"))?);
            if String::from_utf8_lossy(&seen).contains("\"content\":\"") {
                return Ok(());
            }
        }
        Err("the stream ended before its first delta".to_owned())
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no first delta within {timeout:?}"))?
}

/// Opens a connection with a tiny receive buffer, sends a streamed chat
/// request, and returns the socket without ever reading it: a client that
/// never reads, so the server's writes to it soon block.
pub async fn never_reading_client(
    address: std::net::SocketAddr,
    key: &str,
    body: &Value,
) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(1024).expect("a small buffer");
    let mut stream = socket.connect(address).await.expect("connect");
    let body = body.to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    stream
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_stream_is_well_formed_and_a_cut_or_failed_one_is_not() {
        let whole = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n\
                     data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n\
                     data: [DONE]\n\n";
        let answer = SseAnswer::parse(whole);
        assert!(answer.is_well_formed(), "{answer:?}");
        assert_eq!(answer.text, "Hi");
        let cut = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        assert!(!SseAnswer::parse(cut).is_well_formed());
        let failed = format!("{whole}data: {{\"error\":{{\"message\":\"x\"}}}}\n\n");
        assert!(!SseAnswer::parse(&failed).is_well_formed());
    }
}
