//! An incremental Server-Sent Events parser for the client's `jobs watch`: the server's
//! `/api/jobs/{id}/events` stream arrives in arbitrary chunks, and an event is complete only at
//! its blank line. Just the parts of the format the server sends (`event:`, `data:`, comments).

/// One complete event: its `event:` name (`message` when absent) and its joined `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Bytes, not text, are buffered: a chunk may end inside a multi-byte character.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    /// Feed a chunk; returns the events it completed, in order.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        // CRLF line ends become LF (JSON data never holds a raw CR).
        self.buf.extend(chunk.iter().filter(|&&b| b != b'\r'));
        let mut out = Vec::new();
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&raw);
            let mut event = None;
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if line.starts_with(':') {
                    continue; // keep-alive comment
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event = Some(value.to_string()),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            if event.is_some() || !data.is_empty() {
                out.push(SseEvent {
                    event: event.unwrap_or_else(|| "message".into()),
                    data: data.join("\n"),
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_come_out_whole_and_in_order() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: step\ndata: {\"st").is_empty());
        let got = p.push(b"ep\":1}\n\n:keep-alive\n\nevent:status\r\ndata:{}\r\n\r\n");
        assert_eq!(
            got,
            [
                SseEvent {
                    event: "step".into(),
                    data: "{\"step\":1}".into()
                },
                SseEvent {
                    event: "status".into(),
                    data: "{}".into()
                }
            ]
        );
        // A character split across chunks survives.
        let text = "data: \"Però\"\n\n".as_bytes();
        let cut = text.iter().position(|&b| b >= 0x80).unwrap() + 1;
        assert!(p.push(&text[..cut]).is_empty());
        assert_eq!(p.push(&text[cut..])[0].data, "\"Però\"");
        assert_eq!(
            p.push(b"data: a\ndata: b\n\n"),
            [SseEvent {
                event: "message".into(),
                data: "a\nb".into()
            }]
        );
    }
}
