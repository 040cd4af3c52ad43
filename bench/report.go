package bench

import (
	"fmt"
	"io"
	"strings"
)

// WriteTable prints the report as a table, each figure beside its baseline
// and limit, with the figures' notes below it.
func (r *Report) WriteTable(w io.Writer) {
	c := r.Config
	fmt.Fprintf(w, "store %s; %d ASes (%d users regexes each: %s), %d rooms, interest %s, %s membership and %s alias changes, %d-byte events, %d events a round, median of %d rounds\n\n",
		c.Store, c.ASes, c.Namespaces, strings.Join(c.Mix, ","), c.Rooms, formatShare(c.Interest), formatShare(c.Churn), formatShare(c.AliasChurn), c.EventSize, c.Events, c.Rounds)
	tw := newTable(w)
	row(tw, "figure", "unit", "asdispatch", "baseline", "limit", "vs baseline", "of limit")
	var notes []string
	for _, f := range r.Figures {
		name := f.Name
		if f.Note != "" {
			notes = append(notes, fmt.Sprintf("[%d] %s: %s", len(notes)+1, f.Name, f.Note))
			name += fmt.Sprintf(" [%d]", len(notes))
		}
		row(tw, name, f.Unit, FormatNumber(f.Value), FormatNumber(f.Baseline), FormatNumber(f.Limit),
			FormatRatio(f.VsBaseline(), "x"), FormatRatio(100*f.OfLimit(), "%"))
	}
	tw.Flush()
	if len(notes) > 0 {
		fmt.Fprintln(w)
		for _, n := range notes {
			fmt.Fprintln(w, n)
		}
	}
}

// WriteSideBySide puts each figure of every report (one per store) in one
// row.
func WriteSideBySide(w io.Writer, reps []*Report) {
	fmt.Fprintln(w, "side by side (same run, same workload):")
	tw := newTable(w)
	head := []string{"figure", "unit"}
	for _, r := range reps {
		head = append(head, r.Config.Store)
	}
	row(tw, head...)
	seen := map[string]bool{}
	for _, r := range reps {
		for _, f := range r.Figures {
			if seen[f.Name] {
				continue
			}
			seen[f.Name] = true
			cells := []string{f.Name, f.Unit}
			for _, o := range reps {
				g, _ := o.Figure(f.Name)
				cells = append(cells, FormatNumber(g.Value))
			}
			row(tw, cells...)
		}
	}
	tw.Flush()
}
