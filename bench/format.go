package bench

import (
	"fmt"
	"io"
	"math"
	"strings"
	"text/tabwriter"
)

// Every number of the tables has three significant digits: plain below
// 1,000, then with a k, M or G suffix ("7.88 k", "263 k", "1.50 M");
// ratios and shares the same, with their unit and no suffix ("12.3x",
// "0.280x", "51.0%"). --json keeps the raw numbers.

// FormatNumber writes a figure for a table: "-" for none (0).
func FormatNumber(v float64) string {
	if v == 0 || math.IsNaN(v) {
		return "-"
	}
	for _, u := range []struct {
		scale  float64
		suffix string
	}{{1e9, " G"}, {1e6, " M"}, {1e3, " k"}} {
		// Round first: 999,950 is "1.00 M", not "1000 k".
		if s := sig3(math.Abs(v) / u.scale); s >= 1 {
			return fmt.Sprintf("%s%s", trim(v/u.scale), u.suffix)
		}
	}
	return trim(v)
}

// FormatRatio writes a ratio or a share with its unit ("x", "%"): "-" for
// none (0); three significant digits, whole numbers from 1,000 up.
func FormatRatio(v float64, unit string) string {
	if v == 0 || math.IsNaN(v) {
		return "-"
	}
	return trim(v) + unit
}

// formatShare writes a share (0..1) of a workload as a percentage, "0%"
// for none.
func formatShare(v float64) string {
	if v == 0 {
		return "0%"
	}
	return FormatRatio(100*v, "%")
}

// sig3 rounds v > 0 to three significant digits.
func sig3(v float64) float64 {
	if v == 0 || math.IsInf(v, 0) {
		return v
	}
	p := math.Pow(10, 2-math.Floor(math.Log10(v)))
	return math.Round(v*p) / p
}

// trim formats v with three significant digits in fixed point (whole
// numbers from 100 up: 1234 stays "1234").
func trim(v float64) string {
	a := sig3(math.Abs(v))
	if math.IsInf(a, 0) {
		return fmt.Sprint(v)
	}
	decimals := 0
	if a < 100 {
		decimals = int(2 - math.Floor(math.Log10(a)))
	}
	if a >= 1000 {
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.*f", decimals, math.Copysign(a, v))
}

// newTable is the tabwriter of every table: left-aligned columns two
// spaces apart.
func newTable(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 0, 2, ' ', 0) }

// row writes cells as one table row, with no trailing padding.
func row(tw io.Writer, cells ...string) { fmt.Fprintln(tw, strings.Join(cells, "\t")) }
