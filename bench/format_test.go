package bench

import (
	"bytes"
	"math"
	"regexp"
	"strings"
	"testing"
)

func TestFormatNumber(t *testing.T) {
	tests := []struct {
		v    float64
		want string
	}{
		{0, "-"},
		{math.NaN(), "-"},
		{0.28, "0.280"},
		{0.001234, "0.00123"},
		{4.6, "4.60"},
		{15.5, "15.5"},
		{404, "404"},
		{999.4, "999"},
		{999.6, "1.00 k"}, // rounds up into the next unit, not "1000"
		{7882.87, "7.88 k"},
		{10300, "10.3 k"},
		{45000, "45.0 k"},
		{263499, "263 k"},
		{999_950, "1.00 M"},
		{2_600_000, "2.60 M"},
		{21_800_000_000, "21.8 G"},
		{-7882.87, "-7.88 k"},
		{-0.5, "-0.500"},
	}
	for _, tt := range tests {
		if got := FormatNumber(tt.v); got != tt.want {
			t.Errorf("FormatNumber(%v) = %q, want %q", tt.v, got, tt.want)
		}
	}
}

func TestFormatRatio(t *testing.T) {
	tests := []struct {
		v    float64
		unit string
		want string
	}{
		{0, "x", "-"},
		{0.28, "x", "0.280x"},
		{2, "x", "2.00x"},
		{12.34, "x", "12.3x"},
		{143.7, "x", "144x"},
		{1234.4, "x", "1234x"},
		{51.04, "%", "51.0%"},
		{100, "%", "100%"},
		{99.96, "%", "100%"},
		{9.996, "x", "10.0x"},
	}
	for _, tt := range tests {
		if got := FormatRatio(tt.v, tt.unit); got != tt.want {
			t.Errorf("FormatRatio(%v, %q) = %q, want %q", tt.v, tt.unit, got, tt.want)
		}
	}
}

// number is a table cell in the one format: three significant digits,
// with a k, M or G suffix, or a ratio with its unit, or "-".
var number = regexp.MustCompile(`^(-|-?(\d{3}|\d{2}\.\d|\d\.\d{2}|0\.0*\d{3})( [kMG]|x|%)?|\d{4,}[x%])( \((\d{3}|\d{2}\.\d|\d\.\d{2}|0\.0*\d{3}|\d{4,})x\))?$`)

// TestTablesOneFormat: report, side-by-side and sweep tables are
// left-aligned, have no trailing blanks, and every number cell is in the
// one format.
func TestTablesOneFormat(t *testing.T) {
	rep := &Report{Config: Config{Store: StoreSQLite, ASes: 10, Namespaces: 3, Mix: []string{MixPrefix, MixCasefold}, Rooms: 100, Interest: 1, Churn: 0.05, AliasChurn: 0.01, EventSize: 500, Events: 20000, Rounds: 3, CatchupEvents: 100000},
		Figures: []Figure{
			{Name: FigMatcher, Unit: "lookups/s", Value: 2_612_345.6, Baseline: 21_034.2},
			{Name: FigSubmit, Unit: "events/s", Value: 45_012.3, Baseline: 7882.87, Limit: 263_456},
			{Name: FigHalfP99, Unit: "ms", Value: 15.54},
			{Name: FigCatchup, Unit: "s", Value: 0.7, Baseline: 1.4, Limit: 0.35, LowerIsBetter: true, Note: "100000 events"},
			{Name: FigRSS, Unit: "MiB", Value: 62.3, LowerIsBetter: true},
		}}
	other := *rep
	other.Config.Store = StorePostgres
	var b bytes.Buffer
	rep.WriteTable(&b)
	b.WriteString("\n")
	WriteSideBySide(&b, []*Report{rep, &other})
	b.WriteString("\n")
	(&SweepResult{Reports: []*Report{rep, &other}}).WriteTable(&b)
	out := b.String()
	for _, want := range []string{"2.61 M", "21.0 k", "124x", "45.0 k", "7.88 k", "263 k", "5.71x", "17.1%", "15.5", "0.700", "2.00x", "50.0%", "62.3", "45.0 k (5.71x)"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	for _, bad := range []string{"7882.87", "7.9 k", "\r"} {
		if strings.Contains(out, bad) {
			t.Errorf("output has %q:\n%s", bad, out)
		}
	}
	var header []int // column starts of the current table
	for _, line := range strings.Split(out, "\n") {
		if strings.TrimRight(line, " ") != line {
			t.Errorf("trailing blanks: %q", line)
		}
		if strings.HasPrefix(line, "figure ") {
			header = columnStarts(line)
			continue
		}
		if header == nil || line == "" {
			header = nil
			continue
		}
		// Each cell starts where its header does (left-aligned); the
		// cells after the figure's name and unit are numbers.
		for i, start := range header[2:] {
			if start >= len(line) || line[start-1] != ' ' || line[start-2] != ' ' {
				t.Errorf("column %d does not start at %d in %q", i+2, start, line)
				continue
			}
			end := len(line)
			if i+3 < len(header) {
				end = header[i+3]
			}
			if cell := strings.TrimSpace(line[start:end]); !number.MatchString(cell) {
				t.Errorf("cell %q of %q is not in the one number format", cell, line)
			}
		}
	}
}

// columnStarts returns where each cell of a header row starts (cells are
// two or more spaces apart; header cells hold single spaces).
func columnStarts(line string) []int {
	starts := []int{0}
	for i := 2; i < len(line); i++ {
		if line[i] != ' ' && line[i-1] == ' ' && line[i-2] == ' ' {
			starts = append(starts, i)
		}
	}
	return starts
}
