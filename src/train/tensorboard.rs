//! TensorBoard event files, so `tensorboard --logdir runs/` (or `<data-dir>/runs/`) shows every
//! run's scalars without any conversion step. The format is small enough to write by hand and
//! not worth a protobuf dependency: TFRecord framing (`u64 length`, masked crc32c of the length,
//! payload, masked crc32c of the payload) around `Event` protobufs (`wall_time`, `step`, and
//! either `file_version` or a `Summary` of `simple_value`s). A reader for the same subset lives
//! here too; the tests use it to check the crcs and read the values back.

use super::{TrainEvent, ValidationRecord};
use crate::train::StepRecord;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the first event of every file says (TensorBoard checks it).
pub const FILE_VERSION: &str = "brain.Event:2";

// ---- crc32c (Castagnoli), as TFRecord uses it --------------------------------------------

const fn crc_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0x82F6_3B78 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC_TABLE: [u32; 256] = crc_table();

pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// TFRecord's masked crc: rotate right by 15 and add a constant.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, masked crc of the length, data, masked crc of the data.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

// ---- the protobuf subset ------------------------------------------------------------------

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// `Event { wall_time = 1 (double), step = 2 (int64), file_version = 3 | summary = 5 }`.
fn event(wall_time: f64, step: i64, body: EventBody<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    out.push(0x09); // field 1, fixed64
    out.extend_from_slice(&wall_time.to_le_bytes());
    out.push(0x10); // field 2, varint
    varint(step as u64, &mut out);
    match body {
        EventBody::FileVersion(v) => len_delimited(3, v.as_bytes(), &mut out),
        EventBody::Scalars(values) => {
            // Summary { repeated Value value = 1 }, Value { tag = 1, simple_value = 2 (float) }
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                len_delimited(1, tag.as_bytes(), &mut value);
                value.push(0x15); // field 2, fixed32
                value.extend_from_slice(&(*v as f32).to_le_bytes());
                len_delimited(1, &value, &mut summary);
            }
            len_delimited(5, &summary, &mut out);
        }
    }
    out
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalars(&'a [(&'a str, f64)]),
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

// ---- the writer -----------------------------------------------------------------------------

/// Appends scalars to `events.out.tfevents.<unix time>.<host>.<pid>` in a run directory. A
/// resumed run gets a new file starting at the resumed step; TensorBoard drops the older
/// file's points past that step when it sees the step go back, as the JSONL logs do.
pub struct EventWriter {
    file: BufWriter<fs::File>,
    path: PathBuf,
    skipped_total: u64,
}

impl EventWriter {
    /// A new event file in `dir`; `skipped_before` is the count of skipped steps the run had
    /// before this process (so `amp/skipped_total` continues across a resume).
    pub fn create(dir: &Path, skipped_before: u64) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        let host = fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or_else(|| "localhost".into());
        let t = now();
        let mut n = 0;
        let path = loop {
            let p = dir.join(format!(
                "events.out.tfevents.{}.{host}.{}.{n}",
                t as u64,
                std::process::id()
            ));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let mut w = Self {
            file: BufWriter::new(fs::File::create(&path)?),
            path,
            skipped_total: skipped_before,
        };
        w.write(&event(t, 0, EventBody::FileVersion(FILE_VERSION)))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &[u8]) -> std::io::Result<()> {
        self.file.write_all(&frame(event))?;
        self.file.flush()
    }

    /// Scalars at `step`, stamped now.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        self.write(&event(now(), step as i64, EventBody::Scalars(values)))
    }

    pub fn step(&mut self, r: &StepRecord) -> std::io::Result<()> {
        self.skipped_total += r.skipped as u64;
        self.scalars(
            r.step,
            &[
                ("train/loss", r.loss),
                ("train/lr", r.lr),
                ("train/grad_norm", r.grad_norm),
                ("train/tokens_per_s", r.tokens_per_s),
                ("amp/loss_scale", r.loss_scale),
                ("amp/skipped", r.skipped as u8 as f64),
                ("amp/skipped_total", self.skipped_total as f64),
            ],
        )
    }

    pub fn validation(&mut self, r: &ValidationRecord) -> std::io::Result<()> {
        self.scalars(
            r.step,
            &[
                ("valid/loss", r.val_loss),
                ("valid/bleu", r.bleu),
                ("valid/chrf", r.chrf),
                ("valid/cer", r.cer),
                ("valid/wer", r.wer),
            ],
        )
    }

    /// The scalars of a training event (others are ignored). The runner treats a failure as
    /// best effort: it warns once and the run goes on without further scalars.
    pub fn record(&mut self, ev: &TrainEvent) -> std::io::Result<()> {
        match ev {
            TrainEvent::Step(r) => self.step(r),
            TrainEvent::Validation(r) => self.validation(r),
            _ => Ok(()),
        }
    }
}

/// Skipped steps recorded in a run's `metrics.jsonl` (0 when there is none).
pub fn skipped_in_metrics(path: &Path) -> u64 {
    fs::read_to_string(path)
        .map(|t| {
            t.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["skipped"].as_bool() == Some(true))
                .count() as u64
        })
        .unwrap_or(0)
}

// ---- the reader (for tests and tools) -----------------------------------------------------

/// What went wrong reading an event file.
#[derive(Debug, thiserror::Error)]
pub enum EventFileError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("record at byte {offset}: {what}")]
    Corrupt { offset: usize, what: String },
}

/// One event read back: `file_version` or scalars (tag, value).
#[derive(Debug, Clone, PartialEq)]
pub struct EventRead {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    pub scalars: Vec<(String, f32)>,
}

/// Records of a TFRecord file, each crc checked.
pub fn read_records(bytes: &[u8]) -> Result<Vec<&[u8]>, EventFileError> {
    let mut out = Vec::new();
    let mut i = 0;
    let corrupt = |offset, what: &str| EventFileError::Corrupt {
        offset,
        what: what.into(),
    };
    while i < bytes.len() {
        let head = bytes
            .get(i..i + 12)
            .ok_or_else(|| corrupt(i, "truncated header"))?;
        let len = u64::from_le_bytes(head[..8].try_into().unwrap()) as usize;
        if u32::from_le_bytes(head[8..12].try_into().unwrap()) != masked_crc32c(&head[..8]) {
            return Err(corrupt(i, "length crc mismatch"));
        }
        let data = bytes
            .get(i + 12..i + 12 + len)
            .ok_or_else(|| corrupt(i, "truncated data"))?;
        let crc = bytes
            .get(i + 12 + len..i + 16 + len)
            .ok_or_else(|| corrupt(i, "truncated data crc"))?;
        if u32::from_le_bytes(crc.try_into().unwrap()) != masked_crc32c(data) {
            return Err(corrupt(i, "data crc mismatch"));
        }
        out.push(data);
        i += 16 + len;
    }
    Ok(out)
}

/// Protobuf fields of one message: (field number, wire value).
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

fn fields(mut b: &[u8]) -> Option<Vec<(u32, Field<'_>)>> {
    fn read_varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b)?;
        let f = match key & 7 {
            0 => Field::Varint(read_varint(&mut b)?),
            1 => {
                let (x, rest) = b.split_at_checked(8)?;
                b = rest;
                Field::Fixed64(x.try_into().ok()?)
            }
            5 => {
                let (x, rest) = b.split_at_checked(4)?;
                b = rest;
                Field::Fixed32(x.try_into().ok()?)
            }
            2 => {
                let n = read_varint(&mut b)? as usize;
                let (x, rest) = b.split_at_checked(n)?;
                b = rest;
                Field::Bytes(x)
            }
            _ => return None,
        };
        out.push(((key >> 3) as u32, f));
    }
    Some(out)
}

fn parse_event(data: &[u8]) -> Option<EventRead> {
    let mut ev = EventRead {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
    };
    for (n, f) in fields(data)? {
        match (n, f) {
            (1, Field::Fixed64(x)) => ev.wall_time = f64::from_le_bytes(x),
            (2, Field::Varint(v)) => ev.step = v as i64,
            (3, Field::Bytes(s)) => ev.file_version = Some(String::from_utf8(s.to_vec()).ok()?),
            (5, Field::Bytes(summary)) => {
                for (vn, value) in fields(summary)? {
                    let (1, Field::Bytes(value)) = (vn, value) else {
                        continue;
                    };
                    let mut tag = None;
                    let mut simple = None;
                    for (k, f) in fields(value)? {
                        match (k, f) {
                            (1, Field::Bytes(t)) => tag = Some(String::from_utf8(t.to_vec()).ok()?),
                            (2, Field::Fixed32(x)) => simple = Some(f32::from_le_bytes(x)),
                            _ => {}
                        }
                    }
                    if let (Some(t), Some(v)) = (tag, simple) {
                        ev.scalars.push((t, v));
                    }
                }
            }
            _ => {}
        }
    }
    Some(ev)
}

/// Every event of an event file, crcs checked.
pub fn read_events(path: &Path) -> Result<Vec<EventRead>, EventFileError> {
    let bytes = fs::read(path)?;
    let records = read_records(&bytes)?;
    let mut offset = 0;
    records
        .into_iter()
        .map(|r| {
            offset += r.len() + 16;
            parse_event(r).ok_or_else(|| EventFileError::Corrupt {
                offset: offset - r.len() - 16,
                what: "not an Event protobuf".into(),
            })
        })
        .collect()
}

/// The event files of a run directory, oldest first.
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("events.out.tfevents."))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // The CRC-32C check value of "123456789" (RFC 3720, appendix B.4).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
        assert_eq!(
            masked_crc32c(b"123456789"),
            0xE306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn a_scalar_event_has_the_protobuf_bytes_tensorboard_reads() {
        let e = event(1.5, 300, EventBody::Scalars(&[("a", 2.0)]));
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300 as a varint
                                                     // summary (field 5): value (field 1): tag "a" (field 1), simple_value 2.0 (field 2)
        want.extend_from_slice(&[0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
    }

    #[test]
    fn a_flipped_byte_fails_the_crc_check() {
        let mut bytes = frame(&event(1.0, 1, EventBody::Scalars(&[("x", 1.0)])));
        assert_eq!(read_records(&bytes).unwrap().len(), 1);
        let mid = bytes.len() / 2;
        bytes[mid] ^= 1;
        assert!(matches!(
            read_records(&bytes),
            Err(EventFileError::Corrupt { offset: 0, .. })
        ));
        assert!(matches!(
            read_records(&bytes[..bytes.len() - 1]),
            Err(EventFileError::Corrupt { .. })
        ));
    }
}
