//! Row addressing over a strided layout viewed as (rows, d), d the last dim: how every row
//! kernel finds and loads its rows without first making the input contiguous.

use super::Elem;
use candle_core::Layout;

/// Row addressing over a strided layout viewed as (rows, d) with d the last dim.
#[derive(Clone, Debug)]
pub(crate) struct Rows {
    pub n_rows: usize,
    pub d: usize,
    /// Stride of the last dim.
    pub step: usize,
    start: usize,
    /// Leading dims and their strides (innermost last); empty when rows are evenly spaced.
    lead: Vec<(usize, usize)>,
    /// Distance between consecutive rows when `lead` is empty.
    row_stride: usize,
}

impl Rows {
    pub fn new(layout: &Layout) -> Self {
        let dims = layout.dims();
        let strides = layout.stride();
        let (d, step) = match dims.last() {
            Some(&d) => (d, strides[dims.len() - 1]),
            None => (1, 1),
        };
        let lead_dims = &dims[..dims.len().saturating_sub(1)];
        let lead_strides = &strides[..dims.len().saturating_sub(1)];
        let n_rows: usize = lead_dims.iter().product();
        // Collapse the leading dims when they form one evenly spaced sequence.
        let mut row_stride = None;
        let mut expected: Option<usize> = None;
        let mut evenly = true;
        for (&dim, &st) in lead_dims.iter().zip(lead_strides).rev() {
            if dim == 1 {
                continue;
            }
            match expected {
                None => {
                    row_stride = Some(st);
                    expected = Some(st * dim);
                }
                Some(e) if e == st => expected = Some(st * dim),
                Some(_) => {
                    evenly = false;
                    break;
                }
            }
        }
        let lead = if evenly {
            Vec::new()
        } else {
            lead_dims
                .iter()
                .copied()
                .zip(lead_strides.iter().copied())
                .collect()
        };
        Rows {
            n_rows,
            d,
            step,
            start: layout.start_offset(),
            lead,
            row_stride: row_stride.unwrap_or(0),
        }
    }

    #[inline]
    pub fn offset(&self, r: usize) -> usize {
        if self.lead.is_empty() {
            return self.start + r * self.row_stride;
        }
        let mut off = self.start;
        let mut r = r;
        for &(dim, st) in self.lead.iter().rev() {
            off += (r % dim) * st;
            r /= dim;
        }
        off
    }

    /// Loads row `r` of `src` into `dst` (len d) as f32.
    #[inline]
    pub fn load<T: Elem>(&self, src: &[T], r: usize, dst: &mut [f32]) {
        let off = self.offset(r);
        if self.step == 1 {
            T::load(&src[off..off + self.d], dst);
        } else {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = src[off + i * self.step].to_f32();
            }
        }
    }
}
