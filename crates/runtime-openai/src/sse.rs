//! A byte-level decoder for server-sent events.
//!
//! Works on raw bytes so that a line, an event, or a UTF-8 character split across
//! network chunks is reassembled before it is decoded. Follows the event-stream
//! grammar: lines end in LF, CR or CRLF (a CRLF split across chunks counts once),
//! `data:` lines of one event are joined with `\n`, lines starting with `:` are
//! comments (llama-server's keep-alive pings), and an empty line ends an event.

use runtime_core::{Error, Result};

/// The most bytes one event may hold; a peer that never ends an event would
/// otherwise grow the buffer without bound.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The `event:` field, if any.
    pub event: Option<String>,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

/// Incremental SSE decoder: feed it chunks, collect events.
#[derive(Debug, Default)]
pub struct SseDecoder {
    line: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    event: Option<String>,
    /// The previous chunk ended in CR: a leading LF in the next one is its pair.
    pending_cr: bool,
}

impl SseDecoder {
    /// A decoder at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Decodes `chunk`, appending every event it completes to `events`.
    pub fn feed(&mut self, chunk: &[u8], events: &mut Vec<SseEvent>) -> Result<()> {
        let mut rest = chunk;
        if self.pending_cr {
            self.pending_cr = false;
            if let [b'\n', tail @ ..] = rest {
                rest = tail;
            }
        }
        while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
            self.line.extend_from_slice(&rest[..end]);
            self.end_line(events)?;
            let is_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            if is_cr {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.pending_cr = true,
                }
            }
        }
        self.line.extend_from_slice(rest);
        if self.line.len() + self.data.len() > MAX_EVENT_BYTES {
            return Err(Error::StreamProtocol(format!(
                "an event exceeds {MAX_EVENT_BYTES} bytes"
            )));
        }
        Ok(())
    }

    /// How many bytes of unfinished lines and events are buffered; never more
    /// than the per-event bound plus one chunk.
    pub fn buffered_bytes(&self) -> usize {
        self.line.len() + self.data.len()
    }

    /// Whether bytes of an unfinished event are buffered.
    pub fn has_partial_event(&self) -> bool {
        self.has_data || !self.line.is_empty()
    }

    fn end_line(&mut self, events: &mut Vec<SseEvent>) -> Result<()> {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            self.dispatch(events)?;
            return Ok(());
        }
        if line[0] == b':' {
            return Ok(());
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line.as_slice(), &[][..]),
        };
        match field {
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            b"event" => self.event = Some(utf8(value.to_vec())?),
            // `id` and `retry` matter to browsers reconnecting, not to us.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, events: &mut Vec<SseEvent>) -> Result<()> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        let data = utf8(std::mem::take(&mut self.data))?;
        events.push(SseEvent { event, data });
        Ok(())
    }
}

fn utf8(bytes: Vec<u8>) -> Result<String> {
    String::from_utf8(bytes)
        .map_err(|err| Error::StreamProtocol(format!("an event is not valid UTF-8: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_chunks(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        for chunk in chunks {
            decoder.feed(chunk, &mut events).unwrap();
        }
        events
    }

    fn data(events: &[SseEvent]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn lf_cr_and_crlf_line_ends_all_separate_events() {
        let events = decode_chunks(&[b"data: a\n\ndata: b\r\rdata: c\r\n\r\n"]);
        assert_eq!(data(&events), ["a", "b", "c"]);
    }

    #[test]
    fn a_crlf_split_across_chunks_ends_one_line_only() {
        let events = decode_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]);
        assert_eq!(data(&events), ["a\nb"]);
    }

    #[test]
    fn multi_line_data_is_joined_with_newlines() {
        let events = decode_chunks(&[b"data: first\ndata:second\ndata\n\n"]);
        assert_eq!(data(&events), ["first\nsecond\n"]);
    }

    #[test]
    fn comments_and_unknown_fields_are_skipped() {
        let events = decode_chunks(&[b": ping\n\nid: 7\nretry: 10\nevent: delta\ndata: x\n\n"]);
        assert_eq!(
            events,
            [SseEvent {
                event: Some("delta".into()),
                data: "x".into()
            }]
        );
    }

    #[test]
    fn an_event_split_across_chunks_is_reassembled() {
        let events = decode_chunks(&[b"da", b"ta: {\"a\"", b":1}", b"\n", b"\n"]);
        assert_eq!(data(&events), ["{\"a\":1}"]);
    }

    #[test]
    fn a_utf8_character_split_across_chunks_is_reassembled() {
        let bytes = "data: É🙂\n\n".as_bytes();
        // Split inside the two-byte É and inside the four-byte emoji.
        let events = decode_chunks(&[&bytes[..7], &bytes[7..10], &bytes[10..]]);
        assert_eq!(data(&events), ["É🙂"]);
    }

    #[test]
    fn invalid_utf8_is_a_protocol_error() {
        let mut decoder = SseDecoder::new();
        let err = decoder
            .feed(b"data: \xff\n\n", &mut Vec::new())
            .unwrap_err();
        assert!(matches!(err, Error::StreamProtocol(_)));
    }

    #[test]
    fn an_unfinished_event_is_reported_as_partial() {
        let mut decoder = SseDecoder::new();
        let mut events = Vec::new();
        decoder.feed(b"data: half", &mut events).unwrap();
        assert!(events.is_empty() && decoder.has_partial_event());
    }
}
