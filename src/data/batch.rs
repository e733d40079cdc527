//! Encoding pairs into examples, length-bucketed epoch plans and per-batch padding.

use super::{Pair, WordTokenizer, EOS_ID, PAD_ID, SOS_ID};
use crate::config::OnLong;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// One encoded pair: both sides are `[SOS] words [EOS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub src: Vec<u32>,
    pub tgt: Vec<u32>,
}

impl Example {
    /// Decoder positions (= labels) of this example: `tgt.len() - 1`.
    pub fn tgt_positions(&self) -> usize {
        self.tgt.len().saturating_sub(1)
    }

    /// The padded length this example forces on a batch: `max(src.len(), tgt.len() - 1)`.
    pub fn cost_len(&self) -> usize {
        self.src.len().max(self.tgt_positions())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EncodeStats {
    pub kept: usize,
    pub dropped_long: usize,
    pub truncated: usize,
    pub dropped_empty: usize,
}

/// A pair is too long when src.len() > max_len or tgt.len() - 1 > max_len (the decoder input and the labels are
/// each tgt.len()-1 long). OnLong::Drop drops and counts it; OnLong::Truncate cuts the words to fit (keeping
/// [SOS]/[EOS]) and counts it. Pairs whose source or target has no words are dropped and counted.
///
/// So at most `max_len - 2` source words and `max_len - 1` target words are kept.
pub fn encode_pairs(
    pairs: &[Pair],
    src: &WordTokenizer,
    tgt: &WordTokenizer,
    max_len: usize,
    on_long: OnLong,
) -> (Vec<Example>, EncodeStats) {
    let src_cap = max_len.saturating_sub(2);
    let tgt_cap = max_len.saturating_sub(1);
    let mut stats = EncodeStats::default();
    let mut out = Vec::with_capacity(pairs.len());
    for p in pairs {
        let mut sw = src.encode(&p.src);
        let mut tw = tgt.encode(&p.tgt);
        if sw.is_empty() || tw.is_empty() {
            stats.dropped_empty += 1;
            continue;
        }
        if sw.len() > src_cap || tw.len() > tgt_cap {
            if on_long == OnLong::Drop || src_cap == 0 || tgt_cap == 0 {
                stats.dropped_long += 1;
                continue;
            }
            sw.truncate(src_cap);
            tw.truncate(tgt_cap);
            stats.truncated += 1;
        }
        let wrap = |w: Vec<u32>| {
            let mut v = Vec::with_capacity(w.len() + 2);
            v.push(SOS_ID);
            v.extend(w);
            v.push(EOS_ID);
            v
        };
        out.push(Example {
            src: wrap(sw),
            tgt: wrap(tw),
        });
    }
    stats.kept = out.len();
    (out, stats)
}

/// The RNG seed of one epoch's plan.
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    seed ^ epoch.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Batches per sorted chunk: indices are shuffled, then sorted by length within chunks of about
/// this many batches, which keeps the padding small without making the batch order predictable.
pub const BUCKET_CHUNK_BATCHES: usize = 100;

/// Length-bucketed batches, deterministic for (seed, epoch): shuffle indices, sort chunks of ~100 batches by
/// length, cut into batches of `batch_size` sentences, or, when max_tokens > 0, of as many sentences as keep
/// batch_len * max(src_len, tgt_len) <= max_tokens; then shuffle the batch order. Every example appears exactly once.
///
/// `src_len`/`tgt_len` are the padded lengths [`make_batch`] produces (`tgt_len` = longest
/// `tgt.len() - 1`). A single example longer than `max_tokens` still gets a batch of its own.
/// With `max_tokens > 0` the chunk size is estimated from the mean example length.
pub fn plan_epoch(
    examples: &[Example],
    batch_size: usize,
    max_tokens: usize,
    seed: u64,
    epoch: u64,
) -> Vec<Vec<usize>> {
    let n = examples.len();
    if n == 0 {
        return Vec::new();
    }
    let batch_size = batch_size.max(1);
    let mut rng = StdRng::seed_from_u64(epoch_seed(seed, epoch));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng);
    let per_batch = if max_tokens > 0 {
        let mean = examples
            .iter()
            .map(Example::cost_len)
            .sum::<usize>()
            .div_ceil(n);
        (max_tokens / mean.max(1)).max(1)
    } else {
        batch_size
    };
    let chunk = per_batch.saturating_mul(BUCKET_CHUNK_BATCHES).max(1);
    let mut batches = Vec::with_capacity(n / per_batch + 1);
    for c in idx.chunks_mut(chunk) {
        // stable: equal lengths keep their shuffled order
        c.sort_by_key(|&i| {
            let e = &examples[i];
            (e.cost_len(), e.src.len(), e.tgt.len())
        });
        if max_tokens == 0 {
            batches.extend(c.chunks(batch_size).map(<[usize]>::to_vec));
            continue;
        }
        let mut cur: Vec<usize> = Vec::new();
        let mut cur_len = 0usize;
        for &i in c.iter() {
            let len = cur_len.max(examples[i].cost_len());
            if !cur.is_empty() && (cur.len() + 1) * len > max_tokens {
                batches.push(std::mem::take(&mut cur));
                cur_len = examples[i].cost_len();
            } else {
                cur_len = len;
            }
            cur.push(i);
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
    }
    batches.shuffle(&mut rng);
    batches
}

/// Padded per batch to the longest member (NOT to a fixed length). Host-side, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub size: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    /// size*src_len, PAD-padded.
    pub src: Vec<u32>,
    /// size*tgt_len: [SOS] words, PAD-padded.
    pub tgt_in: Vec<u32>,
    /// size*tgt_len: words [EOS], PAD-padded.
    pub tgt_out: Vec<u32>,
    /// Non-pad labels (the loss's normaliser).
    pub n_tgt_tokens: usize,
    /// Non-pad source tokens (specials included).
    pub n_src_tokens: usize,
}

/// The batch's tensors on a device: `u32`, shapes `(size, src_len)` / `(size, tgt_len)`.
#[derive(Debug, Clone)]
pub struct DeviceBatch {
    pub src: Tensor,
    pub tgt_in: Tensor,
    pub labels: Labels,
}

/// The batch's labels without their padding: the loss projects and scores only these rows of
/// the decoder output, so no work is spent on PAD positions (a third of the reference's
/// synthetic batch; little in length-bucketed training batches).
#[derive(Debug, Clone)]
pub struct Labels {
    /// `(n,)` u32: positions in the flattened `(size * tgt_len)` decoder output, ascending.
    pub rows: Tensor,
    /// `(n,)` u32: the label at each of those positions.
    pub ids: Tensor,
}

/// Gather `idx` from `examples` and pad to the batch's longest source and target.
pub fn make_batch(examples: &[Example], idx: &[usize]) -> Batch {
    let size = idx.len();
    let src_len = idx
        .iter()
        .map(|&i| examples[i].src.len())
        .max()
        .unwrap_or(0);
    let tgt_len = idx
        .iter()
        .map(|&i| examples[i].tgt_positions())
        .max()
        .unwrap_or(0);
    let mut src = vec![PAD_ID; size * src_len];
    let mut tgt_in = vec![PAD_ID; size * tgt_len];
    let mut tgt_out = vec![PAD_ID; size * tgt_len];
    let (mut n_src_tokens, mut n_tgt_tokens) = (0, 0);
    for (row, &i) in idx.iter().enumerate() {
        let e = &examples[i];
        src[row * src_len..row * src_len + e.src.len()].copy_from_slice(&e.src);
        let t = e.tgt_positions();
        if t > 0 {
            tgt_in[row * tgt_len..row * tgt_len + t].copy_from_slice(&e.tgt[..t]);
            tgt_out[row * tgt_len..row * tgt_len + t].copy_from_slice(&e.tgt[1..]);
        }
        n_src_tokens += e.src.len();
        n_tgt_tokens += t;
    }
    Batch {
        size,
        src_len,
        tgt_len,
        src,
        tgt_in,
        tgt_out,
        n_tgt_tokens,
        n_src_tokens,
    }
}

impl Batch {
    /// The non-PAD labels: (their positions in `tgt_out`, the labels).
    pub fn labels(&self) -> (Vec<u32>, Vec<u32>) {
        self.tgt_out
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != PAD_ID)
            .map(|(i, &t)| (i as u32, t))
            .unzip()
    }

    /// What [`Batch::to_device`] copies to the device, in bytes: the padded source and decoder
    /// input, and the labels' positions and values.
    pub fn device_bytes(&self) -> u64 {
        let labels = self.tgt_out.iter().filter(|&&t| t != PAD_ID).count();
        let ids = self.src.len() + self.tgt_in.len() + 2 * labels;
        (ids * std::mem::size_of::<u32>()) as u64
    }

    /// Copy to `dev`: the source and decoder input as `u32` tensors of shape `(size, len)`, the
    /// labels as [`Labels`].
    pub fn to_device(&self, dev: &Device) -> candle_core::Result<DeviceBatch> {
        let (rows, ids) = self.labels();
        let n = rows.len();
        debug_assert_eq!(n, self.n_tgt_tokens);
        crate::counters::h2d_bytes(self.device_bytes());
        Ok(DeviceBatch {
            src: Tensor::from_slice(&self.src, (self.size, self.src_len), dev)?,
            tgt_in: Tensor::from_slice(&self.tgt_in, (self.size, self.tgt_len), dev)?,
            labels: Labels {
                rows: Tensor::from_vec(rows, n, dev)?,
                ids: Tensor::from_vec(ids, n, dev)?,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_tsv, UNK_ID};
    use std::path::Path;
    use std::sync::OnceLock;

    struct Fixture {
        pairs: Vec<Pair>,
        src: WordTokenizer,
        tgt: WordTokenizer,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let p =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tatoeba-en-it/train.en-it.tsv");
            let c = read_tsv(&p).unwrap();
            let src = WordTokenizer::train(c.pairs.iter().map(|p| p.src.as_str()), 2).unwrap();
            let tgt = WordTokenizer::train(c.pairs.iter().map(|p| p.tgt.as_str()), 2).unwrap();
            Fixture {
                pairs: c.pairs,
                src,
                tgt,
            }
        })
    }

    #[test]
    fn over_long_pairs_are_dropped_or_truncated_and_counted() {
        let f = fixture();
        let max_len = 10;
        let expected_long = f
            .pairs
            .iter()
            .filter(|p| {
                f.src.encode(&p.src).len() + 2 > max_len || f.tgt.encode(&p.tgt).len() + 1 > max_len
            })
            .count();
        assert!(
            expected_long > 100,
            "test needs long pairs: {expected_long}"
        );
        let (ex, st) = encode_pairs(&f.pairs, &f.src, &f.tgt, max_len, OnLong::Drop);
        assert_eq!(st.dropped_long, expected_long);
        assert_eq!(st.truncated, 0);
        assert_eq!(st.dropped_empty, 0);
        assert_eq!(st.kept, ex.len());
        assert_eq!(st.kept + st.dropped_long, f.pairs.len());
        for e in &ex {
            assert!(e.src.len() <= max_len && e.tgt.len() - 1 <= max_len);
            assert_eq!((e.src[0], *e.src.last().unwrap()), (SOS_ID, EOS_ID));
            assert_eq!((e.tgt[0], *e.tgt.last().unwrap()), (SOS_ID, EOS_ID));
        }
        // the first kept example is the encoding of the first short pair
        let first = f
            .pairs
            .iter()
            .find(|p| {
                f.src.encode(&p.src).len() + 2 <= max_len && f.tgt.encode(&p.tgt).len() < max_len
            })
            .unwrap();
        assert_eq!(
            ex[0].src[1..ex[0].src.len() - 1],
            f.src.encode(&first.src)[..]
        );

        let (ex, st) = encode_pairs(&f.pairs, &f.src, &f.tgt, max_len, OnLong::Truncate);
        assert_eq!(st.truncated, expected_long);
        assert_eq!(st.dropped_long, 0);
        assert_eq!(st.kept, f.pairs.len());
        let mut hit_src_cap = false;
        for (e, p) in ex.iter().zip(&f.pairs) {
            assert!(e.src.len() <= max_len && e.tgt.len() - 1 <= max_len);
            assert_eq!((e.src[0], *e.src.last().unwrap()), (SOS_ID, EOS_ID));
            assert_eq!((e.tgt[0], *e.tgt.last().unwrap()), (SOS_ID, EOS_ID));
            // truncation keeps a prefix of the words
            let w = f.src.encode(&p.src);
            assert_eq!(e.src[1..e.src.len() - 1], w[..e.src.len() - 2]);
            hit_src_cap |= e.src.len() == max_len;
        }
        assert!(hit_src_cap);

        // pairs without words are dropped and counted
        let t = WordTokenizer::train(["a b"], 1).unwrap();
        let empty = [Pair {
            src: String::new(),
            tgt: "a".into(),
        }];
        let (ex, st) = encode_pairs(&empty, &t, &t, 8, OnLong::Drop);
        assert!(ex.is_empty());
        assert_eq!(st.dropped_empty, 1);
        let unk = [Pair {
            src: "zz".into(),
            tgt: "a".into(),
        }];
        let (ex, _) = encode_pairs(&unk, &t, &t, 8, OnLong::Drop);
        assert_eq!(ex[0].src, vec![SOS_ID, UNK_ID, EOS_ID]);
    }

    fn assert_partition(plan: &[Vec<usize>], n: usize) {
        let mut seen = vec![0u32; n];
        for b in plan {
            assert!(!b.is_empty());
            for &i in b {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1), "every example exactly once");
    }

    fn padded_fraction(ex: &[Example], plan: &[Vec<usize>]) -> f64 {
        let (mut pad, mut total) = (0usize, 0usize);
        for b in plan {
            let batch = make_batch(ex, b);
            total += batch.src.len() + batch.tgt_out.len();
            pad += batch.src.len() + batch.tgt_out.len() - batch.n_src_tokens - batch.n_tgt_tokens;
        }
        pad as f64 / total as f64
    }

    #[test]
    fn plan_epoch_partitions_deterministically_and_buckets() {
        let f = fixture();
        let (ex, _) = encode_pairs(&f.pairs, &f.src, &f.tgt, 64, OnLong::Drop);
        let n = ex.len();
        let p0 = plan_epoch(&ex, 32, 0, 42, 0);
        assert_partition(&p0, n);
        // chunks hold 100 full batches, so only the very last batch can be short
        assert_eq!(p0.len(), n.div_ceil(32));
        assert!(p0.iter().all(|b| b.len() <= 32));
        assert!(p0.iter().filter(|b| b.len() < 32).count() <= 1);
        assert_eq!(p0, plan_epoch(&ex, 32, 0, 42, 0));
        let p1 = plan_epoch(&ex, 32, 0, 42, 1);
        assert_partition(&p1, n);
        assert_ne!(p0, p1);
        assert_ne!(p0, plan_epoch(&ex, 32, 0, 43, 0));

        // bucketing: far less padding than random batches of the same size
        let mut rnd: Vec<usize> = (0..n).collect();
        rnd.shuffle(&mut StdRng::seed_from_u64(5));
        let random: Vec<Vec<usize>> = rnd.chunks(32).map(<[usize]>::to_vec).collect();
        let (pb, pr) = (padded_fraction(&ex, &p0), padded_fraction(&ex, &random));
        eprintln!("padding fraction: bucketed {pb:.4}, random {pr:.4}");
        assert!(pb < pr / 3.0, "bucketed {pb} vs random {pr}");
    }

    #[test]
    fn plan_epoch_respects_max_tokens() {
        let f = fixture();
        let (mut ex, _) = encode_pairs(&f.pairs, &f.src, &f.tgt, 64, OnLong::Drop);
        let max_tokens = 300;
        // one example longer than max_tokens on its own
        ex.push(Example {
            src: [SOS_ID]
                .into_iter()
                .chain(vec![5; 400])
                .chain([EOS_ID])
                .collect(),
            tgt: vec![SOS_ID, 5, EOS_ID],
        });
        let plan = plan_epoch(&ex, 8, max_tokens, 1, 3);
        assert_partition(&plan, ex.len());
        assert_eq!(plan, plan_epoch(&ex, 8, max_tokens, 1, 3));
        assert_ne!(plan, plan_epoch(&ex, 8, max_tokens, 1, 4));
        let mut sizes = Vec::new();
        for b in &plan {
            let batch = make_batch(&ex, b);
            let cost = batch.size * batch.src_len.max(batch.tgt_len);
            if b.len() == 1 && b[0] == ex.len() - 1 {
                assert!(cost > max_tokens);
                continue;
            }
            assert!(cost <= max_tokens, "batch of {} costs {cost}", b.len());
            sizes.push(b.len());
        }
        // batches are filled: short sentences pack many more than batch_size
        let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
        assert!(mean > 20.0, "mean batch size {mean}");
        assert!(sizes.iter().any(|&s| s > 8));
    }

    #[test]
    fn batches_pad_to_their_own_longest_member() {
        let f = fixture();
        let (ex, _) = encode_pairs(&f.pairs, &f.src, &f.tgt, 64, OnLong::Drop);
        // pick three examples of different lengths
        let mut by_len: Vec<usize> = (0..ex.len()).collect();
        by_len.sort_by_key(|&i| ex[i].src.len());
        let idx = [
            by_len[0],
            by_len[by_len.len() / 2],
            by_len[by_len.len() / 3],
        ];
        let b = make_batch(&ex, &idx);
        let max_src = idx.iter().map(|&i| ex[i].src.len()).max().unwrap();
        let max_tgt = idx.iter().map(|&i| ex[i].tgt.len() - 1).max().unwrap();
        assert_eq!((b.size, b.src_len, b.tgt_len), (3, max_src, max_tgt));
        assert!(b.src_len < 64);
        assert_eq!(b.src.len(), 3 * b.src_len);
        assert_eq!(b.tgt_in.len(), 3 * b.tgt_len);
        for (row, &i) in idx.iter().enumerate() {
            let e = &ex[i];
            let s = &b.src[row * b.src_len..(row + 1) * b.src_len];
            assert_eq!(&s[..e.src.len()], &e.src[..]);
            assert!(s[e.src.len()..].iter().all(|&t| t == PAD_ID));
            let ti = &b.tgt_in[row * b.tgt_len..(row + 1) * b.tgt_len];
            let to = &b.tgt_out[row * b.tgt_len..(row + 1) * b.tgt_len];
            let t = e.tgt.len() - 1;
            assert_eq!(ti[0], SOS_ID);
            assert_eq!(&ti[..t], &e.tgt[..t]);
            assert_eq!(&to[..t], &e.tgt[1..]);
            assert_eq!(to[t - 1], EOS_ID);
            assert!(ti[t..].iter().chain(&to[t..]).all(|&x| x == PAD_ID));
        }
        let non_pad = b.tgt_out.iter().filter(|&&t| t != PAD_ID).count();
        assert_eq!(b.n_tgt_tokens, non_pad);
        assert_eq!(
            b.n_tgt_tokens,
            idx.iter().map(|&i| ex[i].tgt.len() - 1).sum::<usize>()
        );
        assert_eq!(
            b.n_src_tokens,
            b.src.iter().filter(|&&t| t != PAD_ID).count()
        );

        let d = b.to_device(&Device::Cpu).unwrap();
        assert_eq!(d.src.dims(), &[3, b.src_len]);
        assert_eq!(d.tgt_in.dims(), &[3, b.tgt_len]);
        assert_eq!(d.tgt_in.dtype(), candle_core::DType::U32);
        // the labels without padding: each at its position in the padded layout
        let rows = d.labels.rows.to_vec1::<u32>().unwrap();
        let ids = d.labels.ids.to_vec1::<u32>().unwrap();
        assert_eq!(rows.len(), b.n_tgt_tokens);
        assert!(rows.windows(2).all(|w| w[0] < w[1]));
        for (&r, &t) in rows.iter().zip(&ids) {
            assert_eq!(b.tgt_out[r as usize], t);
        }
        let padded_non_pad: Vec<u32> = b.tgt_out.iter().copied().filter(|&t| t != PAD_ID).collect();
        assert_eq!(ids, padded_non_pad);
        assert_eq!(
            b.device_bytes(),
            ((b.src.len() + b.tgt_in.len() + 2 * ids.len()) * 4) as u64
        );
    }
}
