package bench

import (
	"context"
	"testing"
)

func TestRunSmall(t *testing.T) {
	if testing.Short() {
		t.Skip("starts servers and databases")
	}
	rep, err := Run(context.Background(), Config{ASes: 3, Rooms: 5, Interest: 0.5, Events: 400, Rounds: 1, MaxEventsPerTxn: 20}, nil)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]Figure{}
	for _, f := range rep.Figures {
		if f.Value <= 0 {
			t.Errorf("%s has no value", f.Name)
		}
		byName[f.Name] = f
	}
	if f := byName["matcher lookups"]; f.Baseline <= 0 {
		t.Errorf("matcher has no baseline: %+v", f)
	}
	if f := byName["end to end (acknowledged by every interested AS)"]; f.Baseline <= 0 || f.Limit <= 0 {
		t.Errorf("end to end lacks its references: %+v", f)
	}
}

func TestRoomASesFollowInterest(t *testing.T) {
	tests := []struct {
		ases     int
		interest float64
		want     int
	}{
		{10, 1, 10},
		{10, 0.5, 5},
		{10, 0.01, 1},
		{3, 0.5, 2},
	}
	for _, tt := range tests {
		c := Config{ASes: tt.ases, Interest: tt.interest}
		c.defaults()
		if got := len(c.roomASes(7)); got != tt.want {
			t.Errorf("%d ASes at %.2f: %d per room, want %d", tt.ases, tt.interest, got, tt.want)
		}
	}
}
