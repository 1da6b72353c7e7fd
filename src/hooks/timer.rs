//! The timer hook, after Chainer's `TimerHook`.

use std::fmt;
use std::sync::{Arc, Mutex};

use super::{HookArgs, WeightHook};
use crate::error::{Error, Result};
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

/// The hook name of a weight's whole forward in the timer's rows.
const FORWARD: &str = "(forward)";

/// Chainer's `_choose_unit`: the largest of sec, ms, us in which `seconds` is at
/// least 1, else ns; `(factor, unit)`.
fn choose_unit(seconds: f64) -> (f64, &'static str) {
    let mut factor = 1.0;
    for unit in ["sec", "ms", "us"] {
        if seconds * factor >= 1.0 {
            return (factor, unit);
        }
        factor *= 1000.0;
    }
    (factor, "ns")
}

/// One entry of [`TimerHook::summary`] (Chainer's `{'elapsed_time', 'occurrence'}`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TimerSummary {
    /// Seconds, summed.
    pub elapsed_time: f64,
    /// Calls.
    pub occurrence: usize,
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

    /// Adds a measurement (to merge timers of several threads, or replay rows).
    pub fn record(&mut self, row: TimerRow) {
        if let Ok(mut r) = self.rows.lock() {
            r.push(row);
        }
    }

    /// Total seconds of the outermost spans, as Chainer's `total_time()`: the weights'
    /// whole forwards, or, where the timer saw none (added to hooks only), every span.
    pub fn total_time(&self) -> f64 {
        let rows = self.rows();
        let forwards: Vec<&TimerRow> = rows.iter().filter(|r| r.hook == FORWARD).collect();
        if forwards.is_empty() {
            rows.iter().map(|r| r.seconds).sum()
        } else {
            forwards.iter().map(|r| r.seconds).sum()
        }
    }

    /// Elapsed seconds and calls per hook (`(forward)` for the weights' whole
    /// forwards), in first-seen order: Chainer's `summary()`, keyed by hook as
    /// Chainer's is keyed by link.
    pub fn summary(&self) -> Vec<(String, TimerSummary)> {
        let mut out: Vec<(String, TimerSummary)> = Vec::new();
        for row in self.rows() {
            match out.iter_mut().find(|(k, _)| *k == row.hook) {
                Some((_, s)) => {
                    s.elapsed_time += row.seconds;
                    s.occurrence += 1;
                }
                None => out.push((
                    row.hook,
                    TimerSummary {
                        elapsed_time: row.seconds,
                        occurrence: 1,
                    },
                )),
            }
        }
        out
    }

    /// Chainer's `print_report` as text: a right-aligned table `HookName ElapsedTime
    /// Occurrence`, times as `%3.2f` plus the unit. `unit`: `sec`, `ms`, `us`, `ns`,
    /// `auto` (Chainer's default: the unit of the largest entry, for every entry) or
    /// `auto_foreach` (each entry its own).
    pub fn report_text(&self, unit: &str) -> Result<String> {
        let summary = self.summary();
        let fixed = match unit {
            "sec" => Some((1.0, "sec")),
            "ms" => Some((1e3, "ms")),
            "us" => Some((1e6, "us")),
            "ns" => Some((1e9, "ns")),
            "auto" => Some(choose_unit(
                summary
                    .iter()
                    .map(|(_, s)| s.elapsed_time)
                    .fold(0.0, f64::max),
            )),
            "auto_foreach" => None,
            other => {
                return Err(Error::input(
                    "timer",
                    format!("unit `{other}`: sec, ms, us, ns, auto or auto_foreach"),
                ))
            }
        };
        let mut entries = vec![[
            "HookName".to_string(),
            "ElapsedTime".to_string(),
            "Occurrence".to_string(),
        ]];
        for (name, s) in &summary {
            let (factor, unit) = fixed.unwrap_or_else(|| choose_unit(s.elapsed_time));
            entries.push([
                name.clone(),
                format!("{:.2}{unit}", s.elapsed_time * factor),
                s.occurrence.to_string(),
            ]);
        }
        let width = |k: usize| entries.iter().map(|e| e[k].len()).max().unwrap_or(0);
        let (a, b, c) = (width(0), width(1), width(2));
        Ok(entries
            .iter()
            .map(|e| format!("{:>a$}  {:>b$}  {:>c$}\n", e[0], e[1], e[2]))
            .collect())
    }

    /// Prints [`Self::report_text`] to standard output.
    pub fn print_report(&self, unit: &str) -> Result<()> {
        print!("{}", self.report_text(unit)?);
        Ok(())
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
        self.open(rec, args.weight, FORWARD);
        Ok(())
    }

    fn forward_postprocess(&mut self, rec: &mut Recording<'_>, args: &HookArgs<'_>) -> Result<()> {
        self.close(rec, args.weight, FORWARD);
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
