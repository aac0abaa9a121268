//! The activity chart: activities and blocks per time bucket as an inline SVG bar chart, drawn on
//! the server from [`crate::store::Store::stats`] (no script, no library), with a marker over
//! each bucket in which alerts were raised (their count in it, linked to the alerts page).

use std::fmt::Write as _;

use super::html::{esc, time_ms};
use crate::store::Bucket;

/// Bucket sizes the chart picks from (ms): the smallest that gives at most [`MAX_BARS`] bars.
const STEPS: &[i64] = &[
    60_000,
    5 * 60_000,
    15 * 60_000,
    3_600_000,
    3 * 3_600_000,
    6 * 3_600_000,
    12 * 3_600_000,
    86_400_000,
    7 * 86_400_000,
    30 * 86_400_000,
];
/// Most bars drawn.
pub const MAX_BARS: i64 = 60;

const W: i64 = 960;
const H: i64 = 200;
const LEFT: i64 = 48;
const BOTTOM: i64 = 28;
const TOP: i64 = 12;

/// The bucket size for the range `from..to` (ms).
pub fn bucket_for(from: i64, to: i64) -> i64 {
    let span = (to - from).max(1);
    STEPS
        .iter()
        .copied()
        .find(|s| span / s <= MAX_BARS)
        .unwrap_or(365 * 86_400_000)
}

/// The SVG for `buckets` over `from..to` with bucket size `bucket` (ms).
pub fn svg(buckets: &[Bucket], from: i64, to: i64, bucket: i64) -> String {
    svg_with_alerts(buckets, &[], from, to, bucket)
}

/// [`svg`] with `alerts` (`(bucket start, alerts raised in it)`) as markers.
pub fn svg_with_alerts(
    buckets: &[Bucket],
    alerts: &[(i64, u64)],
    from: i64,
    to: i64,
    bucket: i64,
) -> String {
    let bucket = bucket.max(1);
    let start = from.div_euclid(bucket) * bucket;
    let n = ((to - start) / bucket + 1).clamp(1, MAX_BARS + 1);
    let index = |b: &Bucket| (b.t - start).div_euclid(bucket);
    let buckets: Vec<&Bucket> = buckets
        .iter()
        .filter(|b| (0..n).contains(&index(b)))
        .collect();
    let max = buckets
        .iter()
        .map(|b| b.activities)
        .max()
        .unwrap_or(0)
        .max(1);
    let alerts: Vec<(i64, u64)> = alerts
        .iter()
        .map(|(t, n)| ((t - start).div_euclid(bucket), *n))
        .filter(|(i, k)| (0..n).contains(i) && *k > 0)
        .collect();
    let alert_total: u64 = alerts.iter().map(|(_, n)| n).sum();
    let total: u64 = buckets.iter().map(|b| b.activities).sum();
    let blocked: u64 = buckets.iter().map(|b| b.blocks).sum();
    let plot_w = W - LEFT - 8;
    let plot_h = H - TOP - BOTTOM;
    let slot = plot_w as f64 / n as f64;
    let bar_w = (slot * 0.8).max(1.0);
    let y_of = |v: u64| (TOP + plot_h) as f64 - (v as f64 / max as f64) * plot_h as f64;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {W} {H}\" \
         width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{}\">",
        esc(&format!(
            "Activities and blocks from {} to {} UTC: {total} activities, {blocked} blocked, \
             {alert_total} alerts",
            time_ms(from),
            time_ms(to)
        ))
    );
    // Axes and the maximum.
    let _ = write!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b}\" stroke=\"#9aa3b2\"/>\
         <line x1=\"{LEFT}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"#9aa3b2\"/>\
         <text x=\"{tx}\" y=\"{ty}\" font-size=\"11\" text-anchor=\"end\" fill=\"#4a5263\">{max}</text>\
         <text x=\"{tx}\" y=\"{b}\" font-size=\"11\" text-anchor=\"end\" fill=\"#4a5263\">0</text>",
        b = TOP + plot_h,
        r = W - 8,
        tx = LEFT - 4,
        ty = TOP + 10,
    );
    for b in buckets {
        let i = index(b);
        let x = LEFT as f64 + i as f64 * slot + (slot - bar_w) / 2.0;
        let ya = y_of(b.activities);
        let yb = y_of(b.blocks.min(b.activities));
        let base = (TOP + plot_h) as f64;
        let _ = write!(
            s,
            "<g><title>{}: {} activities, {} blocked</title>\
             <rect class=\"act\" x=\"{x:.1}\" y=\"{ya:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"#6aa1ff\"/>",
            esc(&time_ms(b.t)),
            b.activities,
            b.blocks,
            base - ya
        );
        if b.blocks > 0 {
            let _ = write!(
                s,
                "<rect class=\"blk\" x=\"{x:.1}\" y=\"{yb:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" fill=\"#d64545\"/>",
                base - yb
            );
        }
        s.push_str("</g>");
    }
    // Alerts: a marker at the top of the bucket, with the count.
    for (i, k) in &alerts {
        let cx = LEFT as f64 + *i as f64 * slot + slot / 2.0;
        let _ = write!(
            s,
            "<a href=\"/alerts\"><g class=\"alert-mark\"><title>{}: {k} alerts</title>\
             <circle cx=\"{cx:.1}\" cy=\"{cy}\" r=\"7\" fill=\"#f0a020\"/>\
             <text x=\"{cx:.1}\" y=\"{ty}\" font-size=\"9\" text-anchor=\"middle\" fill=\"#1d2330\">{k}</text></g></a>",
            esc(&time_ms(start + i * bucket)),
            cy = TOP + 7,
            ty = TOP + 10,
        );
    }
    // Time labels at both ends, and the legend.
    let _ = write!(
        s,
        "<text x=\"{LEFT}\" y=\"{ly}\" font-size=\"11\" fill=\"#4a5263\">{}</text>\
         <text x=\"{r}\" y=\"{ly}\" font-size=\"11\" text-anchor=\"end\" fill=\"#4a5263\">{}</text>\
         <rect x=\"{lx}\" y=\"2\" width=\"10\" height=\"10\" fill=\"#6aa1ff\"/>\
         <text x=\"{lx2}\" y=\"11\" font-size=\"11\" fill=\"#1d2330\">activities ({total})</text>\
         <rect x=\"{lx3}\" y=\"2\" width=\"10\" height=\"10\" fill=\"#d64545\"/>\
         <text x=\"{lx4}\" y=\"11\" font-size=\"11\" fill=\"#1d2330\">blocked ({blocked})</text>\
         <circle cx=\"{lx5}\" cy=\"7\" r=\"5\" fill=\"#f0a020\"/>\
         <text x=\"{lx6}\" y=\"11\" font-size=\"11\" fill=\"#1d2330\">alerts ({alert_total})</text></svg>",
        esc(&time_ms(start)),
        esc(&time_ms(to)),
        ly = H - 8,
        r = W - 8,
        lx = W - 420,
        lx2 = W - 406,
        lx3 = W - 270,
        lx4 = W - 256,
        lx5 = W - 120,
        lx6 = W - 110,
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_sizes_bound_the_bars() {
        assert_eq!(bucket_for(0, 3_600_000), 60_000);
        assert_eq!(bucket_for(0, 86_400_000), 3_600_000);
        assert_eq!(bucket_for(0, 30 * 86_400_000), 12 * 3_600_000);
        assert_eq!(bucket_for(0, 40 * 86_400_000), 86_400_000);
        for span in [1, 59_000, 7_200_000, 400 * 86_400_000] {
            let b = bucket_for(0, span);
            assert!(span / b <= MAX_BARS, "{span} {b}");
        }
    }

    #[test]
    fn bars_scale_and_blocks_overlay() {
        let h = 3_600_000;
        let buckets = [
            Bucket {
                t: 0,
                activities: 10,
                blocks: 5,
            },
            Bucket {
                t: 2 * h,
                activities: 5,
                blocks: 0,
            },
            // Outside the range: ignored.
            Bucket {
                t: 500 * h,
                activities: 1000,
                blocks: 0,
            },
        ];
        let s = svg(&buckets, 0, 4 * h, h);
        assert_eq!(s.matches("class=\"act\"").count(), 2);
        assert_eq!(s.matches("class=\"blk\"").count(), 1);
        assert!(s.contains("activities (15)"));
        assert!(s.contains(">10</text>"), "the maximum labels the axis");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>"));
        assert!(s.contains("alerts (0)"));
        let with = svg_with_alerts(&buckets, &[(2 * h, 3), (900 * h, 5)], 0, 4 * h, h);
        assert_eq!(with.matches("class=\"alert-mark\"").count(), 1);
        assert!(with.contains("alerts (3)") && with.contains("3 alerts"));
        // An empty range still draws axes.
        let e = svg(&[], 0, h, 60_000);
        assert!(e.contains("activities (0)"));
    }
}
