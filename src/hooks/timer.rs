//! The timer hook, after Chainer's `TimerHook`.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::{HookArgs, WeightHook};
use crate::error::Result;
use crate::gpu::Recording;

/// One timed span: a normalization on a weight, or a weight's whole forward
/// (`hook == "(forward)"`).
#[derive(Clone, Debug, PartialEq)]
pub struct TimerRow {
    /// The weight's name.
    pub weight: String,
    /// The hook's name, or `(forward)` for the weight's whole forward.
    pub hook: String,
    /// Seconds.
    pub seconds: f64,
    /// `true` when measured with GPU timestamp queries, `false` with the wall clock.
    pub gpu: bool,
}

/// Times every normalization of every weight it observes, and every weight's whole
/// forward: from GPU timestamp queries where the device has them, otherwise from the
/// wall clock (the recording is then submitted in segments, each waited on).
/// Register it globally ([`super::register_global`]) or add it to one weight.
///
/// Like Chainer's `TimerHook`, it accumulates until [`Self::clear`]; [`Self::report`]
/// sums the calls per weight and hook.
#[derive(Debug, Default)]
pub struct TimerHook {
    rows: Arc<Mutex<Vec<TimerRow>>>,
    open: Vec<(String, String, usize)>,
}

/// The timer's totals per weight and hook, printable as a table.
#[derive(Clone, Debug, PartialEq)]
pub struct TimerReport {
    /// `(weight, hook, calls, total seconds, gpu)` in first-seen order.
    pub entries: Vec<(String, String, usize, f64, bool)>,
}

impl TimerHook {
    /// An empty timer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every span measured so far, in order.
    pub fn rows(&self) -> Vec<TimerRow> {
        self.rows.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Forgets every measurement.
    pub fn clear(&mut self) {
        if let Ok(mut r) = self.rows.lock() {
            r.clear();
        }
    }

    /// Totals per weight and hook.
    pub fn report(&self) -> TimerReport {
        let mut entries: Vec<(String, String, usize, f64, bool)> = Vec::new();
        for row in self.rows() {
            match entries
                .iter_mut()
                .find(|e| e.0 == row.weight && e.1 == row.hook)
            {
                Some(e) => {
                    e.2 += 1;
                    e.3 += row.seconds;
                }
                None => entries.push((row.weight, row.hook, 1, row.seconds, row.gpu)),
            }
        }
        TimerReport { entries }
    }

    fn open(&mut self, rec: &mut Recording<'_>, weight: &str, hook: &str) {
        let b = rec.boundary();
        self.open.push((weight.to_string(), hook.to_string(), b));
    }

    fn close(&mut self, rec: &mut Recording<'_>, weight: &str, hook: &str) {
        let Some(i) = self
            .open
            .iter()
            .rposition(|(w, h, _)| w == weight && h == hook)
        else {
            return;
        };
        let (weight, hook, begin) = self.open.remove(i);
        let end = rec.boundary();
        let gpu = rec.gpu_timed();
        let rows = self.rows.clone();
        rec.on_times(move |times| {
            if let Ok(mut r) = rows.lock() {
                r.push(TimerRow {
                    weight,
                    hook,
                    seconds: (times[end] - times[begin]).max(0.0),
                    gpu,
                });
            }
        });
    }
}

impl WeightHook for TimerHook {
    fn name(&self) -> &str {
        "timer"
    }

    fn forward_preprocess(&mut self, rec: &mut Recording<'_>, args: &HookArgs<'_>) -> Result<()> {
        self.open(rec, args.weight, "(forward)");
        Ok(())
    }

    fn forward_postprocess(&mut self, rec: &mut Recording<'_>, args: &HookArgs<'_>) -> Result<()> {
        self.close(rec, args.weight, "(forward)");
        Ok(())
    }

    fn hook_preprocess(
        &mut self,
        rec: &mut Recording<'_>,
        args: &HookArgs<'_>,
        hook: &str,
    ) -> Result<()> {
        self.open(rec, args.weight, hook);
        Ok(())
    }

    fn hook_postprocess(
        &mut self,
        rec: &mut Recording<'_>,
        args: &HookArgs<'_>,
        hook: &str,
    ) -> Result<()> {
        self.close(rec, args.weight, hook);
        Ok(())
    }
}

impl TimerReport {
    /// Total seconds of `hook` on `weight`.
    pub fn total(&self, weight: &str, hook: &str) -> Option<f64> {
        self.entries
            .iter()
            .find(|e| e.0 == weight && e.1 == hook)
            .map(|e| e.3)
    }
}

impl fmt::Display for TimerReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<28} {:<24} {:>6} {:>12} {:>12}  clock",
            "weight", "hook", "calls", "total ms", "mean ms"
        )?;
        for (w, h, n, s, gpu) in &self.entries {
            writeln!(
                f,
                "{:<28} {:<24} {:>6} {:>12.3} {:>12.3}  {}",
                w,
                h,
                n,
                s * 1e3,
                s * 1e3 / *n as f64,
                if *gpu { "gpu" } else { "wall" }
            )?;
        }
        Ok(())
    }
}
