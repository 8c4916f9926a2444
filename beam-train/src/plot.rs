//! PNG charts of an evaluation: quality kept vs MoE FLOPs cut for every method, and experts run
//! per token in each layer. Text is drawn with the DejaVu Sans font shipped in `assets/fonts`,
//! so plotting needs no system fonts.

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::error::TrainError;
use crate::eval::EvalReport;

const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; failing to parse it is a build defect.
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("the bundled DejaVu Sans font parses");
    });
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> TrainError {
    TrainError::Plot {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Every method a report can carry, with its colour: BEAM with only the mask routers trained,
/// BEAM trained end-to-end (base parameters too), the fixed smaller K with and without training,
/// and the training-free peers.
const METHODS: [(&str, RGBColor); 7] = [
    ("beam", RGBColor(214, 39, 40)),
    ("beam-e2e", RGBColor(255, 127, 14)),
    ("fixed-k-trained", RGBColor(140, 86, 75)),
    ("fixed-k", RGBColor(127, 127, 127)),
    ("dynamic-skip", RGBColor(31, 119, 180)),
    ("top-p", RGBColor(44, 160, 44)),
    ("entropy-k", RGBColor(148, 103, 189)),
];

/// The quality measure a chart plots, relative to top-K's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// [`EvalReport::next_token_accuracy`].
    NextTokenAccuracy,
    /// [`EvalReport::choice_accuracy`] (reports without it are left out).
    ChoiceAccuracy,
}

impl Quality {
    fn of(self, report: &EvalReport) -> Option<f64> {
        match self {
            Quality::NextTokenAccuracy => Some(report.next_token_accuracy),
            Quality::ChoiceAccuracy => report.choice_accuracy,
        }
    }

    fn axis(self) -> &'static str {
        match self {
            Quality::NextTokenAccuracy => "next-token accuracy, % of top-K",
            Quality::ChoiceAccuracy => "multiple-choice accuracy, % of top-K",
        }
    }
}

/// `quality` relative to top-K (%) against MoE FLOPs cut (%), one curve per method; top-K
/// itself is the point (0, 100).
pub fn quality_vs_flops(
    path: &Path,
    reports: &[EvalReport],
    quality: Quality,
    title: &str,
) -> Result<(), TrainError> {
    register_font();
    let baseline = reports
        .iter()
        .find(|r| r.method == "top-k")
        .ok_or_else(|| plot_error(path, "no top-k report to compare against"))?;
    let base = quality
        .of(baseline)
        .ok_or_else(|| plot_error(path, format!("the top-k report has no {quality:?}")))?;
    // Relative to top-K; a point with no finite value (top-K at 0, e.g. an untrained model) is
    // left out rather than stretching the axes.
    let relative = |r: &EvalReport| {
        quality
            .of(r)
            .map(|q| 100.0 * q / base)
            .filter(|v| v.is_finite())
    };
    let y_min = reports
        .iter()
        .filter_map(relative)
        .fold(100.0f64, f64::min)
        .floor()
        .min(95.0)
        - 1.0;
    // A trained smaller K can beat top-K on a metric: keep such points in view.
    let y_max = reports
        .iter()
        .filter_map(relative)
        .fold(100.0f64, f64::max)
        .ceil()
        + 1.0;
    let root = BitMapBackend::new(path, (960, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0f64..100.0, y_min..y_max)
        .map_err(|e| plot_error(path, e))?;
    chart
        .configure_mesh()
        .x_desc("MoE FLOPs cut vs top-K (%)")
        .y_desc(quality.axis())
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| plot_error(path, e))?;
    chart
        .draw_series(std::iter::once(Circle::new(
            (0.0, 100.0),
            7,
            BLACK.filled(),
        )))
        .map_err(|e| plot_error(path, e))?
        .label("top-K")
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLACK.filled()));
    for (method, color) in METHODS {
        let mut points = reports
            .iter()
            .filter(|r| r.method == method)
            .filter_map(|r| Some((100.0 * r.moe_flops_reduction, relative(r)?)))
            .collect::<Vec<_>>();
        if points.is_empty() {
            continue;
        }
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(3)))
            .map_err(|e| plot_error(path, e))?
            .label(method)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
            });
        chart
            .draw_series(points.iter().map(|&p| Circle::new(p, 5, color.filled())))
            .map_err(|e| plot_error(path, e))?;
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 18))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerLeft)
        .draw()
        .map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}

/// Experts run per token in each MoE layer, one bar group per layer, for each report given.
pub fn experts_per_layer(
    path: &Path,
    reports: &[EvalReport],
    title: &str,
) -> Result<(), TrainError> {
    register_font();
    let layers = reports
        .iter()
        .map(|r| r.per_layer_active_experts.len())
        .max()
        .unwrap_or(0);
    if layers == 0 {
        return Err(plot_error(path, "no per-layer numbers to plot"));
    }
    let top_k = reports.iter().map(|r| r.top_k).max().unwrap_or(1).max(1) as f64;
    let root = BitMapBackend::new(path, (960, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..layers as f64 - 0.5, 0.0f64..top_k * 1.45)
        .map_err(|e| plot_error(path, e))?;
    chart
        .configure_mesh()
        .x_desc("MoE layer")
        .y_desc("experts run per token")
        .x_labels(layers)
        .x_label_formatter(&|x| format!("{}", x.round() as i64))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .draw()
        .map_err(|e| plot_error(path, e))?;
    let palette = [
        RGBColor(120, 120, 120),
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
    ];
    let width = 0.8 / reports.len() as f64;
    for (i, report) in reports.iter().enumerate() {
        let color = palette[i % palette.len()];
        chart
            .draw_series(
                report
                    .per_layer_active_experts
                    .iter()
                    .enumerate()
                    .map(|(l, &v)| {
                        let x0 = l as f64 - 0.4 + i as f64 * width;
                        Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], color.filled())
                    }),
            )
            .map_err(|e| plot_error(path, e))?
            .label(report.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], color.filled()));
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| plot_error(path, e))?;
    root.present().map_err(|e| plot_error(path, e))
}
