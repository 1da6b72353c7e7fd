//! `W` as the matrix `M` of the power iteration (`W` viewed as `[A, R, J]`,
//! `M[r, a * J + j] = W[a, r, j]`, never transposed or copied), how its two products
//! are split into binding-sized boxes, and their recording: `M^T u` by column tiles,
//! `M v` by rows.

use bytemuck::{Pod, Zeroable};

use super::OP;
use crate::error::{Error, Result};
use crate::gpu::{Bind, Kernel, PlanLimits, Recording, Spec, Tensor};
use crate::ops::cast::widened;
use crate::ops::channel_stats::{record_dot, vec4_buffer, ReducePlan};
use crate::ops::layout::{
    check_channel_input, row_windows_of_at_most, ChannelLayout, RowGeometry, RowWindow,
};

/// Columns per workgroup of the `M^T u` kernel (`TILE` in shaders/spectral_norm.wgsl).
const COLUMN_TILE: u64 = 64;

/// Columns per workgroup of `mtv_combine` (`COMBINE_COLS` in shaders/spectral_norm.wgsl).
const COMBINE_COLS: u64 = 16;

/// Partial sums per column of `M^T u`, at most (rows are split into this many blocks),
/// on software adapters; four times as many on GPUs.
const MAX_ROW_BLOCKS: u64 = 64;

// Mirrors `ColumnParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct ColumnParams {
    rows: u32,
    inner: u32,
    rj: u32,
    cols: u32,
    row_block: u32,
    r0: u32,
    nr: u32,
    c0: u32,
    nc: u32,
    bind_start: u32,
    tiles: u32,
    u_start: u32,
    p_start: u32,
    _pad: [u32; 2],
}

// Mirrors `CombineParams` in shaders/spectral_norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct CombineParams {
    cols: u32,
    blocks: u32,
    c0: u32,
    n: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ColumnBox {
    pub r0: u64,
    pub nr: u64,
    pub c0: u64,
    pub nc: u64,
    pub bind_start: u64,
    pub bind_len: u64,
}

/// `W` as the matrix `M`: `W` viewed as `[A, R, J]`, `M[r, a * J + j] = W[a, r, j]`,
/// and how the two matrix-vector products are split.
#[derive(Clone, Debug)]
pub(crate) struct Matrix {
    /// `[batch 1, outer A, channels R, inner J]`.
    pub layout: ChannelLayout,
    /// Rows per partial of `M^T u`.
    pub row_block: u64,
    /// Row blocks: partials per column.
    pub blocks: u64,
    /// The boxes of `M^T u`.
    pub boxes: Vec<ColumnBox>,
    /// The split of `M v`.
    pub rows_plan: ReducePlan,
    /// When `M`'s rows are contiguous and short (axis 0, see `row_windows`), `M v`
    /// by the row kernel instead: `tpr` threads per row, one read of each row.
    pub row_windows: Option<Vec<RowWindow>>,
}

impl Matrix {
    pub fn new(shape: &[usize], axis: usize, eps: f32, limits: &PlanLimits) -> Result<Self> {
        let layout = check_channel_input(OP, "weight", "axis", shape, axis, eps)?;
        let (a_n, r_n, j_n) = (layout.outer, layout.channels, layout.inner);
        let cols = a_n * j_n;
        if layout.len() > u64::from(u32::MAX) {
            return Err(Error::TooLarge {
                op: OP,
                problem: format!("a weight of {} elements (at most 2^32 - 1)", layout.len()),
            });
        }
        // u, v and the products `M v` and `M^T u` (a vec4 per element) are bound in
        // windows where they pass a binding; each lives in one buffer.
        let align = limits.align_elems.max(1);
        let window = limits.max_binding_elems.saturating_sub(align);
        if window < COLUMN_TILE {
            return Err(Error::TooLarge {
                op: OP,
                problem: format!(
                    "storage bindings of {} elements are too small",
                    limits.max_binding_elems
                ),
            });
        }
        let rj = r_n * j_n;
        // Row blocks: at most MAX_ROW_BLOCKS partials per column, and the partials
        // ([blocks, cols]) within one binding, or one block (bound a box's columns at a
        // time) when the columns alone pass it. Boxes may split a block.
        // GPUs need more workgroups in flight for tall matrices (the 50000 x 512
        // embedding has 8 column tiles); a CPU adapter pays for each one.
        let max_row_blocks = if limits.tuning.coalesced {
            4 * MAX_ROW_BLOCKS
        } else {
            MAX_ROW_BLOCKS
        };
        let max_blocks = max_row_blocks.min(limits.max_binding_elems / cols).max(1);
        let row_block = r_n.div_ceil(max_blocks).max(32).min(r_n);
        let blocks = r_n.div_ceil(row_block);
        let mut boxes = Vec::new();
        let mut push = |r0: u64, nr: u64, c0: u64, nc: u64, start: u64, end: u64| {
            let bind_start = start / align * align;
            boxes.push(ColumnBox {
                r0,
                nr,
                c0,
                nc,
                bind_start,
                bind_len: end - bind_start,
            });
        };
        if a_n * rj <= window {
            push(0, r_n, 0, cols, 0, a_n * rj);
        } else if rj <= window {
            // Whole [R, J] matrices of several `a`.
            let per_box = window / rj;
            let mut a = 0;
            while a < a_n {
                let na = per_box.min(a_n - a);
                push(0, r_n, a * j_n, na * j_n, a * rj, (a + na) * rj);
                a += na;
            }
        } else {
            for a in 0..a_n {
                let base = a * rj;
                if j_n <= window {
                    // Runs of whole rows.
                    let per_box = window / j_n;
                    let mut r = 0;
                    while r < r_n {
                        let nr = per_box.min(r_n - r);
                        push(r, nr, a * j_n, j_n, base + r * j_n, base + (r + nr) * j_n);
                        r += nr;
                    }
                } else {
                    // A row longer than a window: column ranges of single rows.
                    let per_box = window / COLUMN_TILE * COLUMN_TILE;
                    for r in 0..r_n {
                        let mut j = 0;
                        while j < j_n {
                            let nj = per_box.min(j_n - j);
                            let start = base + r * j_n + j;
                            push(r, 1, a * j_n + j, nj, start, start + nj);
                            j += nj;
                        }
                    }
                }
            }
        }
        let rows_plan = ReducePlan::new(OP, layout, limits)?;
        Ok(Matrix {
            layout,
            row_block,
            blocks,
            boxes,
            rows_plan,
            // The row kernel binds a vec4 per row of its window.
            row_windows: row_windows_of_at_most(
                layout,
                limits,
                (limits.max_binding_elems / 4).saturating_sub(limits.align_elems),
            ),
        })
    }

    /// Rows of `M`: the length of `u`.
    pub fn rows(&self) -> u64 {
        self.layout.channels
    }

    /// Columns of `M`: the length of `v`.
    pub fn cols(&self) -> u64 {
        self.layout.outer * self.layout.inner
    }
}

/// `M^T u` as a vec4 per column of `M` (the product in the first component): column
/// partials over row blocks (vec4 when rows and boxes allow), then their sums.
pub(super) fn record_mtv(
    rec: &mut Recording<'_>,
    m: &Matrix,
    weight: &Tensor,
    u: &Tensor,
) -> Result<Tensor> {
    let ctx = rec.context();
    let l = m.layout;
    let cols = m.cols();
    let partials = ctx.scratch(OP, m.blocks * cols)?;
    // Rows a multiple of 4 long and boxes starting at multiples of 4 columns and
    // elements: the vec4 kernel (quads of columns never straddle an `a`).
    let by4 = l.inner.is_multiple_of(4)
        && m.boxes.iter().all(|b| {
            b.c0.is_multiple_of(4) && b.nc.is_multiple_of(4) && b.bind_start.is_multiple_of(4)
        });
    if weight.dtype().is_half() && !by4 {
        let wide = widened(rec, weight)?;
        return record_mtv(rec, m, &wide, u);
    }
    let spec = Spec {
        dtype: weight.dtype(),
        ..Spec::default()
    };
    let kernel = if by4 {
        Kernel::SnMtvPartialsVec4
    } else {
        Kernel::SnMtvPartials
    };
    let align = ctx.limits.align_elems.max(1);
    let whole_partials = m.blocks * cols <= ctx.limits.max_binding_elems;
    for bx in &m.boxes {
        let tiles = bx.nc.div_ceil(COLUMN_TILE);
        // The box's rows of u, and its slots of the partials unless they fit whole
        // (then one block: slot = column), each bound from an aligned element.
        let u_start = bx.r0 / align * align;
        let (p_start, p_len) = if whole_partials {
            (0, m.blocks * cols)
        } else {
            let p = bx.c0 / align * align;
            (p, bx.c0 + bx.nc - p)
        };
        rec.dispatch_spec(
            kernel,
            spec,
            &ColumnParams {
                rows: l.channels as u32,
                inner: l.inner as u32,
                rj: (l.channels * l.inner) as u32,
                cols: cols as u32,
                row_block: m.row_block as u32,
                r0: bx.r0 as u32,
                nr: bx.nr as u32,
                c0: bx.c0 as u32,
                nc: bx.nc as u32,
                bind_start: bx.bind_start as u32,
                tiles: tiles as u32,
                u_start: u_start as u32,
                p_start: p_start as u32,
                _pad: [0; 2],
            },
            &[
                Bind::window(weight, bx.bind_start, bx.bind_len),
                Bind::window(u, u_start, bx.r0 + bx.nr - u_start),
                Bind::window(&partials, p_start, p_len),
            ],
            tiles * ((bx.r0 + bx.nr).div_ceil(m.row_block) - bx.r0 / m.row_block),
        )?;
    }
    let raw = vec4_buffer(ctx, OP, cols)?;
    // The sums, in runs of columns whose vec4s fit one binding (from aligned columns;
    // the partials bound from the run's first column too).
    let per = (ctx.limits.max_binding_elems / 4 / align * align).max(align);
    let mut c0 = 0;
    while c0 < cols {
        let n = per.min(cols - c0);
        rec.dispatch(
            Kernel::SnMtvCombine,
            &CombineParams {
                cols: cols as u32,
                blocks: m.blocks as u32,
                c0: c0 as u32,
                n: n as u32,
            },
            &[
                Bind::window(&partials, c0, (m.blocks - 1) * cols + n),
                Bind::window(&raw, c0 * 4, n * 4),
            ],
            n.div_ceil(COMBINE_COLS),
        )?;
        c0 += n;
    }
    Ok(raw)
}

/// `M v` as a vec4 per row of `M` (the product in the first component): the row kernel
/// when `M`'s rows are contiguous and short, else the shared per-channel reduction.
pub(super) fn record_mv(
    rec: &mut Recording<'_>,
    m: &Matrix,
    weight: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    let geo = RowGeometry::new(&m.layout, &rec.context().limits.tuning);
    if weight.dtype().is_half() && m.row_windows.is_some() && !geo.vec4 {
        // Rows not a multiple of 4 long: through f32 (the reduction of `record_dot`
        // decides for itself).
        let wide = widened(rec, weight)?;
        return record_mv(rec, m, &wide, v);
    }
    let Some(windows) = &m.row_windows else {
        return record_dot(rec, OP, &m.rows_plan, weight, v);
    };
    let out = vec4_buffer(rec.context(), OP, m.rows())?;
    let spec = Spec {
        dtype: weight.dtype(),
        ..geo.spec()
    };
    let align = rec.context().limits.align_elems.max(1);
    let mut first_row = 0;
    for w in windows {
        // The window's rows of `out`, bound from an aligned row.
        let out_start = first_row / align * align;
        rec.dispatch_spec(
            geo.pick(Kernel::SnRowsDot),
            spec,
            &geo.params(w, first_row - out_start),
            &[
                Bind::window(weight, w.start, w.len),
                Bind::elems(&v, m.cols()),
                Bind::window(&out, out_start * 4, (first_row + w.rows - out_start) * 4),
            ],
            geo.groups(w),
        )?;
        first_row += w.rows;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(binding: u64) -> PlanLimits {
        PlanLimits::for_tests(binding, 64, false)
    }

    /// Every element of M is in exactly one box, inside the box's window; partials fit
    /// one binding.
    fn check_cover(shape: &[usize], axis: usize, binding: u64) {
        let m = match Matrix::new(shape, axis, 1e-6, &limits(binding)) {
            Ok(m) => m,
            // Only when `M v`'s reduction cannot be planned (channel_stats' own tests).
            Err(Error::TooLarge { .. }) => {
                let layout = check_channel_input(OP, "weight", "axis", shape, axis, 1e-6).unwrap();
                assert!(
                    ReducePlan::new(OP, layout, &limits(binding)).is_err(),
                    "{shape:?}"
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let (a_n, r_n, j_n) = (m.layout.outer, m.layout.channels, m.layout.inner);
        // The partials fit whole, or are one block bound a box's columns at a time.
        assert!(
            m.blocks * a_n * j_n <= binding || m.blocks == 1,
            "{shape:?}"
        );
        if let Some(windows) = &m.row_windows {
            // The row kernel's vec4 per row of a window, from an aligned row.
            assert!(
                windows.iter().all(|w| (w.rows + 64) * 4 <= binding),
                "{shape:?}"
            );
        }
        let mut seen = vec![0u8; (a_n * r_n * j_n) as usize];
        for bx in &m.boxes {
            assert!(bx.bind_len <= binding, "{shape:?} {bx:?}");
            // The box's rows of u and columns of the partials, from aligned elements.
            assert!(
                bx.nr + 64 <= binding && bx.nc + 64 <= binding,
                "{shape:?} {bx:?}"
            );
            for r in bx.r0..bx.r0 + bx.nr {
                for c in bx.c0..bx.c0 + bx.nc {
                    let (a, j) = (c / j_n, c % j_n);
                    let g = a * r_n * j_n + r * j_n + j;
                    assert!(g >= bx.bind_start && g < bx.bind_start + bx.bind_len);
                    seen[g as usize] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&s| s == 1), "{shape:?} axis {axis}");
    }

    #[test]
    fn params_mirror_the_wgsl_structs() {
        use crate::gpu::kernels::mirror;
        mirror!(
            "spectral_norm",
            ColumnParams,
            [
                rows, inner, rj, cols, row_block, r0, nr, c0, nc, bind_start, tiles, u_start,
                p_start
            ]
        );
        mirror!("spectral_norm", CombineParams, [cols, blocks, c0, n]);
    }

    #[test]
    fn column_boxes_cover_the_matrix_once() {
        for binding in [1 << 30, 4096, 1024, 512, 330] {
            check_cover(&[37, 5, 3, 3], 0, binding);
            check_cover(&[7, 37, 3, 3], 1, binding);
            check_cover(&[3, 300], 0, binding); // rows longer than a 330 binding's window
            check_cover(&[700, 3], 0, binding);
            check_cover(&[2, 3, 4, 5, 6], 2, binding);
            check_cover(&[5, 9, 40], 1, binding);
        }
    }
}
