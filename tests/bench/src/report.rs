//! What a benchmark run found, kept as JSON under `target/bench/` (one file
//! per target, so running one target keeps the others' last results), and
//! the report made of them: `report.md` and SVG charts beside it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// A figure measured several times: its median and spread.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
    pub(crate) runs: usize,
}

impl Stat {
    /// The median, least and greatest of `values` (which must not be empty).
    pub(crate) fn of(values: &[f64]) -> Self {
        assert!(!values.is_empty(), "a figure without measurements");
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median = if sorted.len().is_multiple_of(2) {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        } else {
            sorted[mid]
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            runs: sorted.len(),
        }
    }

    /// `median (min–max)` with `decimals` decimals.
    fn show(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

/// Prefill, decode and first-token time of one engine at one thread count
/// and prompt length.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpeedRow {
    pub(crate) engine: String,
    pub(crate) threads: u32,
    /// The prompt's length in tokens, as the engine counted it.
    pub(crate) prompt_tokens: u64,
    pub(crate) prefill_tps: Stat,
    pub(crate) decode_tps: Stat,
    pub(crate) first_token_ms: Stat,
}

/// Tokens per second over all streams of `streams` concurrent requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConcurrencyRow {
    pub(crate) engine: String,
    pub(crate) streams: usize,
    pub(crate) aggregate_tps: Stat,
}

/// Starting and stopping an engine through its runtime.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LifecycleRow {
    pub(crate) engine: String,
    /// `initialize` until it returns ready.
    pub(crate) ready_ms: Stat,
    pub(crate) stop_idle_ms: Stat,
    pub(crate) stop_in_flight_ms: Stat,
}

/// One of our layers against the engine without it, timed in interleaved
/// pairs: `ratio` is the median of per-pair ratios (ours / baseline).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct OverheadRow {
    pub(crate) engine: String,
    pub(crate) layer: String,
    pub(crate) baseline: String,
    pub(crate) ours_ms: Stat,
    pub(crate) baseline_ms: Stat,
    pub(crate) ratio: Stat,
}

/// The results of one benchmark target.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Results {
    pub(crate) target: String,
    /// When it ran (UTC) and on what commit.
    pub(crate) date: String,
    pub(crate) commit: String,
    pub(crate) machine: String,
    /// Engine name to version.
    pub(crate) versions: BTreeMap<String, String>,
    pub(crate) speed: Vec<SpeedRow>,
    pub(crate) concurrency: Vec<ConcurrencyRow>,
    pub(crate) lifecycle: Vec<LifecycleRow>,
    pub(crate) overheads: Vec<OverheadRow>,
    /// Other findings, one sentence each.
    pub(crate) notes: Vec<String>,
}

impl Results {
    /// Empty results for `target`, stamped with the date, commit and machine.
    pub(crate) fn new(target: &str) -> Self {
        Self {
            target: target.to_owned(),
            date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
            commit: command_output("git", &["rev-parse", "--short", "HEAD"]),
            machine: machine(),
            ..Self::default()
        }
    }

    /// Writes the results to `dir/<target>.json`.
    pub(crate) fn save(&self, dir: &Path) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.target));
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)?;
        Ok(path)
    }
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The CPU, its cores, the memory and the kernel.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let flags = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags"))
        .unwrap_or_default();
    let simd: Vec<&str> = ["avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni"]
        .into_iter()
        .filter(|flag| flags.split_whitespace().any(|f| f == *flag))
        .collect();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(String::new, |kib| {
            format!(", {:.0} GiB", kib / 1024.0 / 1024.0)
        });
    format!(
        "{cpu} ({}), {cores} cores{memory}, Linux {}",
        simd.join(" "),
        command_output("uname", &["-r"])
    )
}

/// Reads every target's results in `dir` and writes `report.md` and its
/// charts there. Returns the report's path.
pub(crate) fn render(dir: &Path) -> std::io::Result<PathBuf> {
    let mut all: Vec<Results> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read(&path)?;
            match serde_json::from_slice::<Results>(&text) {
                Ok(results) => all.push(results),
                Err(err) => {
                    tracing::warn!(path = %path.display(), %err, "skipping unreadable results")
                }
            }
        }
    }
    all.sort_by_key(|r| target_order(&r.target));
    let mut md = String::new();
    let _ = writeln!(md, "# model-runtime benchmarks\n");
    let _ = writeln!(
        md,
        "Made by `cargo xtask bench`. Every figure is the median of interleaved runs, \
         with the least and greatest in parentheses; a ratio is the median of per-run \
         ratios, both sides measured in the same run. Each section says when, on what \
         commit and on what machine it ran. The workspace builds with \
         `-C target-cpu=native`; runtime-candle's own kernels choose their \
         instructions at run time (built for plain x86-64 it ran within 5 % of these figures).\n"
    );
    for results in &all {
        section(&mut md, dir, results)?;
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

fn target_order(target: &str) -> usize {
    [
        "candle",
        "llamacpp",
        "vllm",
        "gateway",
        "distributed",
        "structured",
    ]
    .iter()
    .position(|t| *t == target)
    .unwrap_or(usize::MAX)
}

fn section(md: &mut String, dir: &Path, r: &Results) -> std::io::Result<()> {
    let _ = writeln!(md, "## {}\n", r.target);
    let versions: Vec<String> = r.versions.iter().map(|(e, v)| format!("{e} {v}")).collect();
    let _ = writeln!(
        md,
        "{} · commit `{}` · {} · {}\n",
        r.date,
        r.commit,
        r.machine,
        versions.join(", ")
    );
    if !r.speed.is_empty() {
        speed_tables(md, r);
        for (metric, title, file) in [
            (Metric::Decode, "decode, tokens/s", "decode"),
            (Metric::Prefill, "prefill, tokens/s", "prefill"),
            (Metric::FirstToken, "time to first token, ms", "first-token"),
        ] {
            let name = format!("{}-{file}.svg", r.target);
            speed_chart(&dir.join(&name), r, metric, title)
                .map_err(|err| std::io::Error::other(err.to_string()))?;
            let _ = writeln!(md, "![{title}]({name})\n");
        }
    }
    if !r.concurrency.is_empty() {
        let _ = writeln!(md, "### Concurrent streams\n");
        let _ = writeln!(md, "| engine | streams | tokens/s, all streams |");
        let _ = writeln!(md, "|---|---:|---:|");
        for row in &r.concurrency {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                row.engine,
                row.streams,
                row.aggregate_tps.show(1)
            );
        }
        let name = format!("{}-concurrency.svg", r.target);
        concurrency_chart(&dir.join(&name), r)
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        let _ = writeln!(md, "\n![aggregate tokens/s]({name})\n");
    }
    if !r.lifecycle.is_empty() {
        let _ = writeln!(md, "### Start and stop\n");
        let _ = writeln!(
            md,
            "| engine | ready, ms | stop idle, ms | stop mid-stream, ms |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|");
        for row in &r.lifecycle {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                row.engine,
                row.ready_ms.show(0),
                row.stop_idle_ms.show(1),
                row.stop_in_flight_ms.show(1)
            );
        }
        let _ = writeln!(md);
    }
    if !r.overheads.is_empty() {
        let heading = if r.target == "structured" {
            "### Structured answers and tools against the same engine without them"
        } else {
            "### Our layers against the engine directly"
        };
        let _ = writeln!(md, "{heading}\n");
        let _ = writeln!(
            md,
            "| engine | ours | baseline | ours, ms | baseline, ms | ratio |"
        );
        let _ = writeln!(md, "|---|---|---|---:|---:|---:|");
        for row in &r.overheads {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} |",
                row.engine,
                row.layer,
                row.baseline,
                row.ours_ms.show(1),
                row.baseline_ms.show(1),
                row.ratio.show(3)
            );
        }
        let name = format!("{}-overheads.svg", r.target);
        overhead_chart(&dir.join(&name), r)
            .map_err(|err| std::io::Error::other(err.to_string()))?;
        let _ = writeln!(md, "\n![overhead ratios]({name})\n");
    }
    for note in &r.notes {
        let _ = writeln!(md, "- {note}");
    }
    let _ = writeln!(md);
    Ok(())
}

#[derive(Clone, Copy)]
enum Metric {
    Prefill,
    Decode,
    FirstToken,
}

impl Metric {
    fn of(self, row: &SpeedRow) -> Stat {
        match self {
            Self::Prefill => row.prefill_tps,
            Self::Decode => row.decode_tps,
            Self::FirstToken => row.first_token_ms,
        }
    }
}

/// The engines of `rows`, in order of appearance.
fn engines<'a>(rows: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for engine in rows {
        if !out.contains(&engine) {
            out.push(engine);
        }
    }
    out
}

fn speed_tables(md: &mut String, r: &Results) {
    let names = engines(r.speed.iter().map(|s| s.engine.as_str()));
    // Against the first engine, when there is another.
    let baseline = (names.len() > 1).then(|| names[0]);
    let _ = writeln!(md, "### Speed on one stream\n");
    let _ = writeln!(
        md,
        "Measured by the client: prefill is prompt tokens over the time to the first \
         token, decode the tokens after it over the time after it.\n"
    );
    let ratio_heads =
        baseline.map_or_else(String::new, |b| format!(" prefill × {b} | decode × {b} |"));
    let _ = writeln!(
        md,
        "| engine | threads | prompt tokens | prefill tok/s | decode tok/s | first token, ms |{ratio_heads}"
    );
    let columns = if baseline.is_some() { 8 } else { 6 };
    let _ = writeln!(md, "|---|{}", "---:|".repeat(columns - 1));
    for row in &r.speed {
        let ratios = baseline.map_or_else(String::new, |baseline| {
            let base = r.speed.iter().find(|b| {
                b.engine == baseline
                    && b.threads == row.threads
                    && same_prompt(b.prompt_tokens, row.prompt_tokens)
            });
            let ratio = |metric: Metric| {
                base.map_or_else(String::new, |b| {
                    format!("{:.2}", metric.of(row).median / metric.of(b).median)
                })
            };
            format!(" {} | {} |", ratio(Metric::Prefill), ratio(Metric::Decode))
        });
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} |{ratios}",
            row.engine,
            row.threads,
            row.prompt_tokens,
            row.prefill_tps.show(1),
            row.decode_tps.show(1),
            row.first_token_ms.show(1),
        );
    }
    let _ = writeln!(md);
}

/// Whether two prompt lengths are the same prompt (engines count a few
/// tokens apart).
fn same_prompt(a: u64, b: u64) -> bool {
    a.abs_diff(b) * 10 <= a.max(b)
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
];

type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars: for each (threads, prompt) a bar per engine, with its
/// spread as a whisker.
fn speed_chart(path: &Path, r: &Results, metric: Metric, title: &str) -> Drawn {
    let names = engines(r.speed.iter().map(|s| s.engine.as_str()));
    // One group of bars per thread count and prompt.
    let group_of = |groups: &[(u32, u64)], row: &SpeedRow| {
        groups
            .iter()
            .position(|&(t, p)| t == row.threads && same_prompt(p, row.prompt_tokens))
    };
    let mut groups: Vec<(u32, u64)> = Vec::new();
    for row in &r.speed {
        if group_of(&groups, row).is_none() {
            groups.push((row.threads, row.prompt_tokens));
        }
    }
    let top = r
        .speed
        .iter()
        .map(|row| metric.of(row).max)
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let slots = groups.len() * (names.len() + 1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..slots as f64, 0f64..top.max(1.0))?;
    let labels = groups.clone();
    let width = names.len() + 1;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(slots)
        .x_label_formatter(&|x| {
            let slot = *x as usize;
            if slot % width == names.len() / 2 {
                labels
                    .get(slot / width)
                    .map(|(t, p)| format!("{t} thr · {p} tok"))
                    .unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    for (e, engine) in names.iter().enumerate() {
        let color = COLORS[e % COLORS.len()];
        let bars: Vec<(f64, Stat)> = r
            .speed
            .iter()
            .filter(|row| row.engine == *engine)
            .filter_map(|row| {
                let g = group_of(&groups, row)?;
                Some(((g * width + e) as f64, metric.of(row)))
            })
            .collect();
        chart
            .draw_series(bars.iter().map(|(x, s)| {
                Rectangle::new([(*x + 0.1, 0.0), (*x + 0.9, s.median)], color.filled())
            }))?
            .label(*engine)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart.draw_series(bars.iter().map(|(x, s)| {
            PathElement::new(
                vec![(*x + 0.5, s.min), (*x + 0.5, s.max)],
                BLACK.stroke_width(1),
            )
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// Aggregate tokens per second against concurrent streams, a line per engine.
fn concurrency_chart(path: &Path, r: &Results) -> Drawn {
    let names = engines(r.concurrency.iter().map(|c| c.engine.as_str()));
    let max_streams = r.concurrency.iter().map(|c| c.streams).max().unwrap_or(1);
    let top = r
        .concurrency
        .iter()
        .map(|c| c.aggregate_tps.max)
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (640, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("tokens/s over all streams", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.5f64..max_streams as f64 + 0.5, 0f64..top.max(1.0))?;
    chart.configure_mesh().x_desc("concurrent streams").draw()?;
    for (e, engine) in names.iter().enumerate() {
        let color = COLORS[e % COLORS.len()];
        let points: Vec<(f64, Stat)> = r
            .concurrency
            .iter()
            .filter(|c| c.engine == *engine)
            .map(|c| (c.streams as f64, c.aggregate_tps))
            .collect();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|(x, s)| (*x, s.median)),
                color.stroke_width(2),
            ))?
            .label(*engine)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 12, y)], color.stroke_width(2))
            });
        chart.draw_series(points.iter().map(|(x, s)| {
            PathElement::new(vec![(*x, s.min), (*x, s.max)], color.stroke_width(1))
        }))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A bar per overhead ratio, with the 1.0 line.
fn overhead_chart(path: &Path, r: &Results) -> Drawn {
    let rows = &r.overheads;
    let top = rows.iter().map(|o| o.ratio.max).fold(1.0, f64::max) * 1.1;
    let root = SVGBackend::new(path, (900, 80 + 40 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("ours / baseline (1.0: no overhead)", ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(330)
        .build_cartesian_2d(0f64..top, 0f64..rows.len() as f64)?;
    let labels: Vec<String> = rows
        .iter()
        .map(|o| format!("{}: {}", o.engine, o.layer))
        .collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len() * 2 + 1)
        .y_label_formatter(&|y| {
            let i = *y - 0.5;
            if (i - i.round()).abs() < 1e-6 && i >= 0.0 {
                labels.get(i.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, o)| {
        Rectangle::new(
            [(0.0, i as f64 + 0.2), (o.ratio.median, i as f64 + 0.8)],
            COLORS[0].filled(),
        )
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, o)| {
        PathElement::new(
            vec![(o.ratio.min, i as f64 + 0.5), (o.ratio.max, i as f64 + 0.5)],
            BLACK.stroke_width(1),
        )
    }))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, 0.0), (1.0, rows.len() as f64)],
        RED.stroke_width(1),
    )))?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_is_the_median_and_the_spread() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (2.5, 1.0, 10.0, 4));
        assert_eq!(Stat::of(&[4.0, 1.0, 9.0]).median, 4.0);
    }

    #[test]
    fn a_report_renders_from_saved_results() {
        let dir = tempfile::tempdir().unwrap();
        let stat = Stat::of(&[1.0, 2.0, 3.0]);
        let mut results = Results::new("candle");
        results.speed = ["llama-server", "candle"]
            .iter()
            .map(|engine| SpeedRow {
                engine: (*engine).to_owned(),
                threads: 1,
                prompt_tokens: 64,
                prefill_tps: stat,
                decode_tps: stat,
                first_token_ms: stat,
            })
            .collect();
        results.concurrency = vec![ConcurrencyRow {
            engine: "candle".into(),
            streams: 2,
            aggregate_tps: stat,
        }];
        results.overheads = vec![OverheadRow {
            engine: "candle".into(),
            layer: "generate_stream".into(),
            baseline: "HTTP".into(),
            ours_ms: stat,
            baseline_ms: stat,
            ratio: stat,
        }];
        results.save(dir.path()).unwrap();
        let report = std::fs::read_to_string(render(dir.path()).unwrap()).unwrap();
        assert!(
            report.contains("| candle | 1 | 64 | 2.0 (1.0–3.0)"),
            "{report}"
        );
        assert!(report.contains("decode × llama-server"), "{report}");
        for chart in [
            "decode",
            "prefill",
            "first-token",
            "concurrency",
            "overheads",
        ] {
            let svg =
                std::fs::read_to_string(dir.path().join(format!("candle-{chart}.svg"))).unwrap();
            assert!(svg.starts_with("<svg"), "{chart}");
        }
    }
}
