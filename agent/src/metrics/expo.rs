//! The Prometheus text exposition format (version 0.0.4), written by hand: a family header
//! (`# HELP`, `# TYPE`) and its samples, with label values escaped as the format asks. A
//! crate for this would bring a registry and a type per metric kind; the format is a page.

use std::fmt::Write;

/// The `Content-Type` of what [`Exposition`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Text being built. Samples of one family must follow its header without another family in
/// between; callers write family by family.
#[derive(Default)]
pub struct Exposition {
    pub text: String,
}

impl Exposition {
    /// `# HELP` and `# TYPE` of a family. `kind` is `gauge`, `counter` or `histogram`.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    /// One sample: `name{label="value",...} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, val)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                self.text.push_str(key);
                self.text.push_str("=\"");
                escape_label_into(&mut self.text, val);
                self.text.push('"');
            }
            self.text.push('}');
        }
        self.text.push(' ');
        push_value(&mut self.text, value);
        self.text.push('\n');
    }

    /// A histogram's `_bucket` (cumulative, ending in `+Inf`), `_sum` and `_count` samples.
    /// `counts[i]` holds the observations in `(bounds[i-1], bounds[i]]`; the last one those
    /// above every bound.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative as f64);
        }
        self.sample(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative as f64);
    }
}

/// HELP text escapes only backslash and newline.
fn escape_help(help: &str) -> String {
    help.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and newline.
fn escape_label_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Go's spelling of the special values (`+Inf`, `-Inf`, `NaN`); Rust's `Display` otherwise,
/// which prints integers without a fraction (`200`) and never uses an exponent.
fn push_value(out: &mut String, v: f64) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        let _ = write!(out, "{v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_escape_labels_and_spell_special_values() {
        let mut e = Exposition::default();
        e.family(
            "probe_success",
            "gauge",
            "Displays whether or not the probe was a success",
        );
        e.sample("probe_success", &[("instance", "http://a/\"x\"\\\n")], 1.0);
        e.sample("x", &[], f64::NAN);
        e.sample("x", &[], f64::INFINITY);
        e.sample("x", &[], 0.25);
        assert_eq!(
            e.text,
            "# HELP probe_success Displays whether or not the probe was a success\n\
             # TYPE probe_success gauge\n\
             probe_success{instance=\"http://a/\\\"x\\\"\\\\\\n\"} 1\n\
             x NaN\nx +Inf\nx 0.25\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut e = Exposition::default();
        e.histogram("h", &[("t", "a")], &[0.1, 1.0], &[1, 2, 3], 4.5);
        assert_eq!(
            e.text,
            "h_bucket{t=\"a\",le=\"0.1\"} 1\nh_bucket{t=\"a\",le=\"1\"} 3\n\
             h_bucket{t=\"a\",le=\"+Inf\"} 6\nh_sum{t=\"a\"} 4.5\nh_count{t=\"a\"} 6\n"
        );
    }
}
