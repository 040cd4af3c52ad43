package logging

import "testing"

func TestNew(t *testing.T) {
	tests := []struct {
		level   string
		json    bool
		wantErr bool
	}{
		{"info", false, false},
		{"debug", true, false},
		{"error", false, false},
		{"loud", false, true},
	}
	for _, tt := range tests {
		l, err := New(tt.level, tt.json)
		if (err != nil) != tt.wantErr {
			t.Errorf("New(%q) error = %v, wantErr %v", tt.level, err, tt.wantErr)
		}
		if err == nil && l == nil {
			t.Errorf("New(%q) returned no logger", tt.level)
		}
	}
}
