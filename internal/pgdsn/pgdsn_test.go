package pgdsn

import "testing"

func TestWithSearchPath(t *testing.T) {
	tests := []struct{ dsn, want string }{
		{"postgres://u@h:5432/db?sslmode=disable", "postgres://u@h:5432/db?search_path=s1&sslmode=disable"},
		{"postgresql://u@h/db", "postgresql://u@h/db?search_path=s1"},
		{"postgres://u@h/db?search_path=old", "postgres://u@h/db?search_path=s1"},
		{"host=h dbname=db", "host=h dbname=db search_path=s1"},
	}
	for _, tt := range tests {
		if got := WithSearchPath(tt.dsn, "s1"); got != tt.want {
			t.Errorf("WithSearchPath(%q) = %q, want %q", tt.dsn, got, tt.want)
		}
	}
}
