//! PostgreSQL refuses a `NOTIFY` payload of 8000 bytes or more, and a validation event with its
//! sample translations can be larger. Such an event goes out as numbered parts (hex, so JSON
//! escaping cannot grow them past the limit) tagged with the sender and its event number; each
//! listener puts them back together, in whatever order they arrive, before it reads the event.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The largest payload sent (PostgreSQL's limit is 8000 bytes).
pub const MAX_PAYLOAD: usize = 7900;
/// Bytes of the original payload per part: twice that in hex, plus the envelope.
const PART_BYTES: usize = 3800;
/// Unfinished events a listener keeps (a part lost to a full queue leaves one unfinished).
const KEEP_UNFINISHED: usize = 64;

#[derive(Debug, Serialize, Deserialize)]
struct Part {
    /// Sender node and its event number: which parts belong together.
    part_of: (String, u64),
    index: usize,
    count: usize,
    hex: String,
}

/// The payloads to send for `payload`: itself when it fits, else its parts.
pub fn split(node: &str, seq: u64, payload: String) -> Vec<String> {
    if payload.len() <= MAX_PAYLOAD {
        return vec![payload];
    }
    let chunks: Vec<&[u8]> = payload.as_bytes().chunks(PART_BYTES).collect();
    let count = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            serde_json::to_string(&Part {
                part_of: (node.to_string(), seq),
                index,
                count,
                hex: hex::encode(c),
            })
            .expect("a part serializes")
        })
        .collect()
}

/// A listener's unfinished events.
#[derive(Debug, Default)]
pub struct Reassembler {
    unfinished: HashMap<(String, u64), Vec<Option<Vec<u8>>>>,
    /// Arrival order of the unfinished keys, oldest first.
    order: Vec<(String, u64)>,
}

impl Reassembler {
    /// A whole payload: `raw` itself when it is not a part, or the last missing part's event.
    pub fn feed(&mut self, raw: &str) -> Option<String> {
        let Ok(part) = serde_json::from_str::<Part>(raw) else {
            return Some(raw.to_string());
        };
        let bytes = hex::decode(&part.hex).ok()?;
        if part.index >= part.count {
            return None;
        }
        let key = part.part_of;
        let slots = self.unfinished.entry(key.clone()).or_insert_with(|| {
            self.order.push(key.clone());
            vec![None; part.count]
        });
        if slots.len() != part.count {
            return None;
        }
        slots[part.index] = Some(bytes);
        if slots.iter().all(Option::is_some) {
            let whole: Vec<u8> = self
                .unfinished
                .remove(&key)?
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            self.order.retain(|k| *k != key);
            return String::from_utf8(whole).ok();
        }
        while self.order.len() > KEEP_UNFINISHED {
            let oldest = self.order.remove(0);
            self.unfinished.remove(&oldest);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_over_the_notify_limit_goes_in_parts_that_fit_and_comes_back_whole() {
        // JSON full of quotes and multi-byte characters: what escaping would blow up
        let big: String = (0..3000)
            .map(|i| format!("{{\"k\":\"Grüße «{i}» \\\"x\\\"\"}},"))
            .collect();
        assert!(big.len() > 5 * MAX_PAYLOAD);
        let small = "{\"node\":\"b\",\"event\":{}}".to_string();
        let a = split("node-a", 7, big.clone());
        let b = split("node-b", 7, big.replace('k', "q"));
        assert!(a.len() > 5);
        assert!(a.iter().chain(&b).all(|p| p.len() <= MAX_PAYLOAD));
        assert_eq!(
            split("node-a", 8, small.clone()),
            std::slice::from_ref(&small)
        );

        // two senders' parts interleaved, a small event in between
        let mut r = Reassembler::default();
        let mut got = Vec::new();
        for (i, (pa, pb)) in a.iter().zip(&b).enumerate() {
            got.extend(r.feed(pa));
            got.extend(r.feed(pb));
            if i == 2 {
                got.extend(r.feed(&small));
            }
        }
        assert_eq!(got, [small, big.clone(), big.replace('k', "q")]);
        assert!(r.unfinished.is_empty() && r.order.is_empty());
    }

    #[test]
    fn an_event_missing_a_part_is_never_delivered_and_is_forgotten_in_time() {
        let big = "x".repeat(3 * MAX_PAYLOAD);
        let mut r = Reassembler::default();
        for seq in 0..(KEEP_UNFINISHED as u64 + 10) {
            let parts = split("n", seq, big.clone());
            // the last part was dropped (a full queue)
            for p in &parts[..parts.len() - 1] {
                assert_eq!(r.feed(p), None);
            }
        }
        assert_eq!(r.unfinished.len(), KEEP_UNFINISHED);
        assert_eq!(r.order.len(), KEEP_UNFINISHED);
        // a complete one still comes through
        let parts = split("n", 1000, big.clone());
        let whole: Vec<String> = parts.iter().filter_map(|p| r.feed(p)).collect();
        assert_eq!(whole, [big]);
    }
}
