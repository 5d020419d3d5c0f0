//! `--plot OUT.svg` (plotters, SVG backend only, its built-in text estimate instead of a
//! font library): bandwidth against message size for bandwidth runs, goodput per level for
//! kv runs.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use super::report::{BwRow, KvRow};

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Bandwidth (average and peak) against message size, log2 x axis.
pub(crate) fn bw(path: &Path, title: &str, unit: &str, rows: &[BwRow]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let xs: Vec<f64> = rows.iter().map(|r| (r.size as f64).log2()).collect();
    let (x0, x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    let (x0, x1) = if x0 < x1 {
        (x0, x1)
    } else {
        (x0 - 1.0, x0 + 1.0)
    };
    let ymax = rows
        .iter()
        .map(|r| r.peak.max(r.average))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x0..x1, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("message size [bytes]")
        .y_desc(format!("bandwidth [{unit}]"))
        .x_label_formatter(&|x| size_label(2f64.powf(*x)))
        .draw()
        .map_err(err)?;
    let avg: Vec<(f64, f64)> = rows.iter().zip(&xs).map(|(r, &x)| (x, r.average)).collect();
    let peak: Vec<(f64, f64)> = rows.iter().zip(&xs).map(|(r, &x)| (x, r.peak)).collect();
    chart
        .draw_series(LineSeries::new(avg.clone(), BLUE.stroke_width(2)))
        .map_err(err)?
        .label("average")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(avg.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(peak, RED.stroke_width(1)))
        .map_err(err)?
        .label("peak")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    let base: Vec<(f64, f64)> = rows
        .iter()
        .zip(&xs)
        .filter_map(|(r, &x)| r.baseline.as_ref().and_then(|b| b.average).map(|b| (x, b)))
        .collect();
    if !base.is_empty() {
        chart
            .draw_series(LineSeries::new(base, BLACK.stroke_width(1)))
            .map_err(err)?
            .label("baseline")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn size_label(b: f64) -> String {
    let b = b.round() as u64;
    if b >= 1 << 20 {
        format!("{}M", b >> 20)
    } else if b >= 1 << 10 {
        format!("{}K", b >> 10)
    } else {
        b.to_string()
    }
}

/// Goodput per level, as bars.
pub(crate) fn kv(path: &Path, title: &str, rows: &[KvRow]) -> Result<()> {
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let ymax = rows
        .iter()
        .map(|r| r.goodput_gbps)
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.15;
    let n = rows.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(0f64..n as f64, 0.0..ymax)
        .map_err(err)?;
    let names: Vec<String> = rows.iter().map(|r| r.level.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < names.len() {
                names[i].clone()
            } else {
                String::new()
            }
        })
        .x_desc("level")
        .y_desc("goodput [Gb/sec of fp16 KV]")
        .draw()
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            Rectangle::new(
                [(i as f64 + 0.15, 0.0), (i as f64 + 0.85, r.goodput_gbps)],
                BLUE.mix(0.7).filled(),
            )
        }))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}
