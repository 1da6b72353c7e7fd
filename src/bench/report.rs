//! The report's rendering: a Markdown table and two SVG bar charts.

use std::fmt::Write as _;

use super::{Op, Report, Row};

fn ms(s: f64) -> String {
    if s >= 0.1 {
        format!("{:.0} ms", s * 1e3)
    } else if s >= 0.001 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} us", s * 1e6)
    }
}

fn ratio(x: Option<f64>) -> String {
    x.map_or("-".into(), |r| format!("{r:.2}x"))
}

impl Report {
    /// A Markdown table: op, workload, bytes, kernel and end-to-end time, GB/s,
    /// fraction of copy bandwidth, speed-up over the CPU reference and over the peer.
    pub fn table(&self) -> String {
        let peer = self.peer.as_deref().unwrap_or("peer");
        let mut s = String::new();
        let _ = writeln!(
            s,
            "| op | workload | min bytes | kernel | kernel min | end to end | GB/s | / copy bw | vs CPU reference | vs {peer} |"
        );
        let _ = writeln!(
            s,
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
        );
        for r in &self.rows {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} MB | {} | {} | {} | {:.2} | {:.2} | {} | {} |",
                r.case.op.name(),
                r.case.workload.label(),
                r.case.min_bytes() as f64 / 1e6,
                r.kernel_s.map_or("-".into(), ms),
                r.kernel_min_s.map_or("-".into(), ms),
                ms(r.end_to_end_s),
                r.gb_per_s(),
                r.copy_fraction(),
                ratio(r.vs_reference()),
                ratio(r.vs_peer()),
            );
        }
        if !self.yardsticks.is_empty() {
            let _ = writeln!(
                s,
                "\nYardsticks (median kernel time, GB/s counting bytes read and written; \
                 each row's \"/ copy bw\" is against the faster):\n"
            );
            let _ = writeln!(s, "| workload | copy kernel | driver copy |");
            let _ = writeln!(s, "| --- | --- | --- |");
            let cell = |t: Option<f64>, bytes: u64| {
                t.map_or("-".into(), |t| {
                    format!("{} ({:.0} GB/s)", ms(t), bytes as f64 / t / 1e9)
                })
            };
            for y in &self.yardsticks {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} |",
                    y.workload,
                    cell(y.copy_kernel_s, y.bytes),
                    cell(y.driver_copy_s, y.bytes)
                );
            }
        }
        s
    }

    /// Horizontal bars of each case's fraction of the copy bandwidth, with the 70%
    /// target of issue 7 drawn as a line.
    pub fn svg_copy_fraction(&self) -> String {
        let rows: Vec<(String, f64)> = self
            .rows
            .iter()
            .filter(|r| r.case.op != Op::COPY)
            .map(|r| (label(r), r.copy_fraction()))
            .collect();
        let max = rows.iter().map(|r| r.1).fold(1.0, f64::max);
        bars(
            &[
                if self.timestamps {
                    "Fraction of the copy kernel's bandwidth (kernel times, GPU timestamps)"
                } else {
                    "Fraction of the copy kernel's bandwidth (end-to-end times)"
                },
                &self.adapter_name,
            ],
            &rows,
            max,
            Some((0.7, "target 0.7")),
            |v| format!("{v:.2}"),
        )
    }

    /// Horizontal bars of the speed-up over the CPU reference and over the peer (log
    /// scale), for the cases that have them.
    pub fn svg_speedups(&self) -> String {
        let peer = self.peer.clone().unwrap_or_else(|| "peer".into());
        let mut rows = Vec::new();
        for r in self.rows.iter().filter(|r| r.case.op != Op::COPY) {
            if let Some(x) = r.vs_reference() {
                rows.push((format!("{} vs CPU f64", label(r)), x));
            }
            if let Some(x) = r.vs_peer() {
                rows.push((format!("{} vs {peer}", label(r)), x));
            }
        }
        let max = rows.iter().map(|r| r.1).fold(2.0, f64::max);
        let log = |v: f64| (v.max(0.01)).log10();
        let shifted: Vec<(String, f64)> = rows
            .iter()
            .map(|(l, v)| (format!("{l}: {v:.2}x"), log(*v) - log(0.1)))
            .collect();
        bars(
            &[
                "Speed-up, end to end (log scale, line at 1x)",
                &self.adapter_name,
            ],
            &shifted,
            log(max) - log(0.1),
            Some((-log(0.1), "1x")),
            |_| String::new(),
        )
    }
}

fn label(r: &Row) -> String {
    format!("{} {}", r.case.op.name(), r.case.workload.label())
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal bar chart: one bar per row, scaled to `max`, an optional marker line.
fn bars(
    title: &[&str],
    rows: &[(String, f64)],
    max: f64,
    marker: Option<(f64, &str)>,
    value: impl Fn(f64) -> String,
) -> String {
    // Room on the left for the longest label (about 6 px per character at 11 px).
    let longest = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let (left, width, bar_h, top) = (20.0 + 6.2 * longest as f64, 420.0, 16.0, 56.0);
    let height = top + rows.len() as f64 * (bar_h + 4.0) + 30.0;
    let x = |v: f64| left + width * (v / max).clamp(0.0, 1.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{height}" font-family="sans-serif" font-size="11">"#,
        left + width + 60.0
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, line) in title.iter().enumerate() {
        let _ = writeln!(
            s,
            r#"<text x="10" y="{}" font-size="13"{}>{}</text>"#,
            20 + 16 * i,
            if i == 0 { r#" font-weight="bold""# } else { "" },
            xml(line)
        );
    }
    for (i, (name, v)) in rows.iter().enumerate() {
        let y = top + i as f64 * (bar_h + 4.0);
        let color = match marker {
            Some((m, _)) if *v >= m => "#3a7d44",
            Some(_) => "#c0392b",
            None => "#2e86c1",
        };
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            left - 6.0,
            y + bar_h - 4.0,
            xml(name)
        );
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{y}" width="{:.1}" height="{bar_h}" fill="{color}"/>"#,
            x(*v) - left
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}">{}</text>"#,
            x(*v) + 4.0,
            y + bar_h - 4.0,
            xml(&value(*v))
        );
    }
    if let Some((m, text)) = marker {
        let bottom = top + rows.len() as f64 * (bar_h + 4.0);
        let _ = writeln!(
            s,
            r#"<line x1="{0:.1}" y1="{1}" x2="{0:.1}" y2="{bottom}" stroke="black" stroke-dasharray="4 3"/>"#,
            x(m),
            top - 6.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            x(m),
            bottom + 14.0,
            xml(text)
        );
    }
    s.push_str("</svg>\n");
    s
}
