//! The picture a scenario's report carries: the client's request latency over time, with the
//! failure and each failover step marked, as SVG and as PNG (plotters).
//!
//! ```text
//!  Timeline { latency: (s from the failure, ms) per request, marks: (s, what) }
//!     ──draw──> SVGBackend ──> NAME.svg       (text as <text>, laid out with the font)
//!           └─> BitMapBackend ──> NAME.png    (text drawn by ab_glyph from a TTF file)
//! ```

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// What the picture shows.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    pub title: String,
    /// Each request: (seconds from the failure it was sent, its latency in ms).
    pub latency: Vec<(f64, f64)>,
    /// Each mark: (seconds from the failure, what happened).
    pub marks: Vec<(f64, String)>,
}

/// Why a picture could not be drawn.
#[derive(Debug)]
pub struct PictureError(String);

impl std::fmt::Display for PictureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PictureError {}

fn failed(e: impl std::fmt::Display) -> PictureError {
    PictureError(e.to_string())
}

const SIZE: (u32, u32) = (1100, 520);

/// The fonts the PNG's text is drawn with, first found first.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers a TTF font for the bitmap backend's text, once per process.
fn register_font() -> Result<(), PictureError> {
    static REGISTERED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = REGISTERED.get_or_init(|| {
        let path = FONTS
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!(
                    "no TTF font to draw the PNG's text with (looked for {}; \
                     apt install fonts-dejavu-core)",
                    FONTS.join(", ")
                )
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        // plotters keeps registered fonts for the process's life.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{}: not a font", path.display()))?;
        Ok(path)
    });
    result
        .as_ref()
        .map(drop)
        .map_err(|e| PictureError(e.clone()))
}

/// Writes `timeline` as `stem.svg` and `stem.png`; returns both paths.
pub fn draw(timeline: &Timeline, stem: &Path) -> Result<(PathBuf, PathBuf), PictureError> {
    let svg = stem.with_extension("svg");
    let png = stem.with_extension("png");
    // Both backends lay text out with the registered font.
    register_font()?;
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        plot(&root, timeline)?;
        root.present().map_err(failed)?;
    }
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        plot(&root, timeline)?;
        root.present().map_err(failed)?;
    }
    Ok((svg, png))
}

/// Colours for the marks, in order.
const MARK_COLOURS: [RGBColor; 8] = [
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
];

fn plot<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    timeline: &Timeline,
) -> Result<(), PictureError>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(failed)?;
    let times = timeline
        .latency
        .iter()
        .map(|(t, _)| *t)
        .chain(timeline.marks.iter().map(|(t, _)| *t));
    let (first, last) = times.fold((0.0f64, 1.0f64), |(lo, hi), t| (lo.min(t), hi.max(t)));
    let slowest = timeline
        .latency
        .iter()
        .map(|(_, ms)| *ms)
        .fold(10.0f64, f64::max);
    // Latency spans 0.1 ms to seconds: a log scale shows both the normal and the gap.
    let (low, high) = (0.05f64, slowest * 2.0);
    let mut chart = ChartBuilder::on(root)
        .caption(&timeline.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((first - 0.2)..(last + 0.2), (low..high).log_scale())
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc("seconds from the failure")
        .y_desc("client request latency (ms)")
        .draw()
        .map_err(failed)?;
    // Requests that waited long (the client's gap): the span from sent to answered, shaded.
    let waits: Vec<(f64, f64)> = timeline
        .latency
        .iter()
        .filter(|(_, ms)| *ms >= 50.0)
        .map(|(t, ms)| (*t, t + ms / 1e3))
        .collect();
    if !waits.is_empty() {
        let shade = RGBColor(255, 200, 200).filled();
        chart
            .draw_series(
                waits
                    .iter()
                    .map(|(from, to)| Rectangle::new([(*from, low), (*to, high)], shade)),
            )
            .map_err(failed)?
            .label("a request waiting 50 ms or more")
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], shade));
    }
    chart
        .draw_series(
            timeline
                .latency
                .iter()
                .map(|(t, ms)| Circle::new((*t, ms.max(low)), 2, BLUE.filled())),
        )
        .map_err(failed)?
        .label("INCR request (one connection)")
        .legend(|(x, y)| Circle::new((x + 10, y), 3, BLUE.filled()));
    for (n, (at, what)) in timeline.marks.iter().enumerate() {
        let colour = MARK_COLOURS[n % MARK_COLOURS.len()];
        chart
            .draw_series(LineSeries::new(
                [(*at, low), (*at, high)],
                colour.stroke_width(2),
            ))
            .map_err(failed)?
            .label(format!("{at:+.3} s  {what}"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(failed)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site-loss like the ones a scenario records: a request every ~6 ms, the gap, the steps.
    fn recorded() -> Timeline {
        let mut latency: Vec<(f64, f64)> = (0..400)
            .map(|n| (-2.0 + f64::from(n) * 0.006, 0.4 + f64::from(n % 7) * 0.05))
            .collect();
        latency.retain(|(t, _)| !(0.0..0.33).contains(t));
        latency.push((-0.004, 331.0));
        latency.sort_by(|a, b| a.0.total_cmp(&b.0));
        Timeline {
            title: "site-loss (BIRD upstream, WAN 0 ms): client gap 331 ms".into(),
            latency,
            marks: vec![
                (0.0, "site-a killed, links cut".into()),
                (0.301, "site-b: heartbeats silent".into()),
                (0.304, "site-b: witness confirms".into()),
                (0.309, "site-b: VM serving (hot replica)".into()),
                (0.316, "upstream FIB: via site-b".into()),
            ],
        }
    }

    #[test]
    fn the_timeline_picture_is_a_valid_svg_and_png_with_every_mark() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = std::env::var_os("KEEP_PICTURE").map_or(dir.path().to_owned(), PathBuf::from);
        let timeline = recorded();
        let (svg, png) = match draw(&timeline, &dir.join("site-loss")) {
            Ok(paths) => paths,
            Err(e) if e.0.starts_with("no TTF font") && !crate::must_run_privileged() => {
                crate::skip(
                    "the_timeline_picture_is_a_valid_svg_and_png_with_every_mark",
                    &e.0,
                );
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let svg = std::fs::read_to_string(svg).expect("svg");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Every mark is drawn and named, and so is every request.
        for (_, what) in &timeline.marks {
            assert!(svg.contains(what.as_str()), "{what} is in the legend");
        }
        assert!(svg.contains("client request latency (ms)"));
        assert!(svg.matches("<circle").count() >= timeline.latency.len());
        let png = std::fs::read(png).expect("png");
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "the PNG signature");
        assert_eq!(&png[12..16], b"IHDR");
        let width = u32::from_be_bytes(png[16..20].try_into().expect("4 bytes"));
        let height = u32::from_be_bytes(png[20..24].try_into().expect("4 bytes"));
        assert_eq!((width, height), SIZE);
        // Not a blank page: the marks' colours are in it (decoded with the png crate).
        let decoder = png::Decoder::new(std::io::Cursor::new(&png));
        let mut reader = decoder.read_info().expect("decodes");
        let mut pixels = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut pixels).expect("a frame");
        let pixels = &pixels[..frame.buffer_size()];
        let has = |c: RGBColor| pixels.chunks(3).any(|p| p == [c.0, c.1, c.2]);
        assert!(has(MARK_COLOURS[0]), "the failure's mark is drawn");
        assert!(has(BLUE), "the requests are drawn");
    }
}
