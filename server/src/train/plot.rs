//! The loss curve of a run as a PNG (plotters): training loss per step, eval loss where measured.
//! Axis labels need a TrueType font; the usual system paths are tried (DejaVu, Liberation), and
//! without one the chart is drawn without text.

use super::TrainError;
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers the first font found under the family name plotters asks for, once per process.
fn font_available() -> bool {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    *REGISTERED.get_or_init(|| {
        let Some(bytes) = FONT_PATHS.iter().find_map(|p| std::fs::read(p).ok()) else { return false };
        // plotters keeps a 'static reference; the font lives as long as the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
    })
}

/// Draws `losses` (one per step, from step 1) and `evals` (`(step, loss)`) into `path`.
pub fn write_loss_curve(path: &Path, losses: &[f64], evals: &[(usize, f64)]) -> Result<(), TrainError> {
    let err = |e: String| TrainError::Write(format!("{}: {e}", path.display()));
    let finite = |v: &f64| v.is_finite();
    let all = losses.iter().copied().chain(evals.iter().map(|e| e.1)).filter(finite);
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        return Err(err("no finite loss to draw".into()));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let steps = losses.len().max(1) as f64;
    let text = font_available();
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(16);
    if text {
        builder.caption("training loss", ("sans-serif", 22)).x_label_area_size(40).y_label_area_size(56);
    }
    let mut chart = builder
        .build_cartesian_2d(1f64..steps.max(2.0), (lo - pad).max(0.0)..hi + pad)
        .map_err(|e| err(e.to_string()))?;
    let mut mesh = chart.configure_mesh();
    if text {
        mesh.x_desc("step").y_desc("loss");
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|e| err(e.to_string()))?;
    let train = losses.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| ((i + 1) as f64, v));
    chart
        .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
        .map_err(|e| err(e.to_string()))?
        .label("train")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !evals.is_empty() {
        let eval = evals.iter().filter(|(_, v)| v.is_finite()).map(|&(s, v)| (s as f64, v));
        chart
            .draw_series(LineSeries::new(eval, RED.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label("eval")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
