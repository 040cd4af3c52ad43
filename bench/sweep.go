package bench

import (
	"context"
	"fmt"
	"image/color"
	"io"
	"os"
	"strconv"
	"strings"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// Sweep is a list of AS counts to run the figures for.
type Sweep struct {
	ASes []int
}

// ParseSweep parses "ases=10,100,1000,10000".
func ParseSweep(s string) (Sweep, error) {
	key, list, ok := strings.Cut(s, "=")
	if !ok || strings.TrimSpace(key) != "ases" {
		return Sweep{}, fmt.Errorf("want ases=N,N,..., got %q", s)
	}
	var sw Sweep
	for _, v := range strings.Split(list, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(v))
		if err != nil || n <= 0 {
			return Sweep{}, fmt.Errorf("bad AS count %q", v)
		}
		sw.ASes = append(sw.ASes, n)
	}
	return sw, nil
}

// sweepDeliveries is how many ASes each event reaches at every point of a
// sweep, so that points differ in the number of ASes, not in the work.
const sweepDeliveries = 10

// Point returns the configuration of the sweep point with n ASes: the
// interest is capped so an event reaches at most 10 ASes, and past 1,000
// ASes the events are cut in proportion (n ASes cost n senders and
// transactions, not more deliveries).
func (sw Sweep) Point(base Config, n int) Config {
	c := base
	c.ASes = n
	c.defaults()
	c.Interest = min(c.Interest, float64(sweepDeliveries)/float64(n))
	if n > 1000 {
		c.Events = max(1000, c.Events*1000/n)
		if c.CatchupEvents > 0 {
			c.CatchupEvents = max(1000, c.CatchupEvents*1000/n)
		}
	}
	return c
}

// SweepResult is one report per point.
type SweepResult struct {
	Reports []*Report `json:"reports"`
}

// RunSweep runs every point of sw in turn.
func RunSweep(ctx context.Context, base Config, sw Sweep, progress Progress) (*SweepResult, error) {
	if progress == nil {
		progress = func(string, int, int) {}
	}
	res := &SweepResult{}
	for i, n := range sw.ASes {
		c := sw.Point(base, n)
		rep, err := Run(ctx, c, func(stage string, done, total int) {
			progress(fmt.Sprintf("%d ASes: %s", n, stage), i*total+done, len(sw.ASes)*total)
		})
		if err != nil {
			return nil, fmt.Errorf("%w (sweep at %d ASes)", err, n)
		}
		res.Reports = append(res.Reports, rep)
	}
	return res, nil
}

// WriteTable prints each figure per point, with its ratio to the baseline
// where it has one.
func (r *SweepResult) WriteTable(w io.Writer) {
	if len(r.Reports) == 0 {
		return
	}
	fmt.Fprintf(w, "sweep: each event reaches at most %d ASes; past 1,000 ASes events are cut in proportion\n\n", sweepDeliveries)
	tw := newTable(w)
	cells := []string{"figure", "unit"}
	for _, rep := range r.Reports {
		cells = append(cells, fmt.Sprintf("%d ASes", rep.Config.ASes))
	}
	row(tw, cells...)
	for _, p := range []struct {
		name, unit string
		value      func(c Config) string
	}{
		{"interest", "%", func(c Config) string { return FormatRatio(100*c.Interest, "") }},
		{"events a round", "events", func(c Config) string { return FormatNumber(float64(c.Events)) }},
		{"catch-up backlog", "events", func(c Config) string { return FormatNumber(float64(max(0, c.CatchupEvents))) }},
	} {
		cells = []string{p.name, p.unit}
		for _, rep := range r.Reports {
			cells = append(cells, p.value(rep.Config))
		}
		row(tw, cells...)
	}
	for _, f := range r.Reports[0].Figures {
		cells = []string{f.Name, f.Unit}
		for _, rep := range r.Reports {
			g, _ := rep.Figure(f.Name)
			cell := FormatNumber(g.Value)
			if v := g.VsBaseline(); v != 0 {
				cell += " (" + FormatRatio(v, "x") + ")"
			}
			cells = append(cells, cell)
		}
		row(tw, cells...)
	}
	tw.Flush()
}

// panel is one plot of the sweep: figures (or their ratio to the baseline)
// against the number of ASes.
type panel struct {
	title, y string
	logY     bool
	lines    []line
}

type line struct {
	label string
	fig   string
	ratio bool // plot VsBaseline instead of Value
	base  bool // plot the baseline instead of Value
}

var panels = []panel{
	{"throughput", "per second (log)", true, []line{
		{label: "decisions", fig: FigDecisions},
		{label: "decisions, baseline", fig: FigDecisions, base: true},
		{label: "Submit", fig: FigSubmit},
		{label: "end to end", fig: FigEndToEnd},
		{label: "end to end, baseline", fig: FigEndToEnd, base: true},
	}},
	{"times the baseline", "x (log)", true, []line{
		{label: "matcher", fig: FigMatcher, ratio: true},
		{label: "decisions", fig: FigDecisions, ratio: true},
		{label: "end to end", fig: FigEndToEnd, ratio: true},
		{label: "catch-up", fig: FigCatchup, ratio: true},
	}},
	{"latency", "ms", false, []line{
		{label: "p99 full load", fig: FigP99},
		{label: "p99 half load", fig: FigHalfP99},
		{label: "p50 half load", fig: FigHalfP50},
	}},
	{"memory and disk", "MiB, bytes/event", false, []line{
		{label: "peak RSS (MiB)", fig: FigRSS},
		{label: "stored bytes/event", fig: FigStored},
	}},
}

// Plot writes the sweep as a PNG of four panels to path.
func (r *SweepResult) Plot(path string) error {
	const cols, rows = 2, 2
	img := vgimg.New(vg.Points(1000), vg.Points(720))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: rows, Cols: cols, PadX: vg.Millimeter * 4, PadY: vg.Millimeter * 4,
		PadTop: vg.Millimeter * 2, PadBottom: vg.Millimeter * 2, PadLeft: vg.Millimeter * 2, PadRight: vg.Millimeter * 2}
	for i, pn := range panels {
		p := plot.New()
		p.Title.Text = pn.title
		p.X.Label.Text = "application services (log)"
		p.Y.Label.Text = pn.y
		p.X.Scale = plot.LogScale{}
		p.X.Tick.Marker = plot.LogTicks{Prec: -1}
		if pn.logY {
			p.Y.Scale = plot.LogScale{}
			p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
		}
		p.Legend.Top = true
		p.Legend.Left = true
		drawn := 0
		for j, l := range pn.lines {
			var pts plotter.XYs
			for _, rep := range r.Reports {
				f, ok := rep.Figure(l.fig)
				v := f.Value
				switch {
				case l.ratio:
					v = f.VsBaseline()
				case l.base:
					v = f.Baseline
				}
				if ok && v > 0 {
					pts = append(pts, plotter.XY{X: float64(rep.Config.ASes), Y: v})
				}
			}
			if len(pts) == 0 {
				continue
			}
			ln, sc, err := plotter.NewLinePoints(pts)
			if err != nil {
				return fmt.Errorf("bench: plot: %w", err)
			}
			c := plotColors[j%len(plotColors)]
			ln.Color, sc.Color = c, c
			if l.base {
				ln.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
			}
			p.Add(ln, sc)
			p.Legend.Add(l.label, ln, sc)
			drawn++
		}
		if drawn == 0 { // nothing measured: keep the axes valid
			p.Add(plotter.NewGrid())
		}
		p.Draw(tiles.At(dc, i%cols, i/cols))
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("bench: plot: %w", err)
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("bench: plot: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("bench: plot: %w", err)
	}
	return nil
}

var plotColors = []color.Color{
	color.RGBA{0x1f, 0x77, 0xb4, 0xff},
	color.RGBA{0xff, 0x7f, 0x0e, 0xff},
	color.RGBA{0x2c, 0xa0, 0x2c, 0xff},
	color.RGBA{0xd6, 0x27, 0x28, 0xff},
	color.RGBA{0x94, 0x67, 0xbd, 0xff},
}
