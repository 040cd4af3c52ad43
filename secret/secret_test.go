package secret

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

func TestTokenNeverPrints(t *testing.T) {
	tok := New("hunter2-super-secret")
	js, _ := json.Marshal(struct{ T Token }{tok})
	for name, s := range map[string]string{
		"%v":   fmt.Sprintf("%v", tok),
		"%s":   fmt.Sprintf("%s", tok),
		"%+v":  fmt.Sprintf("%+v", struct{ T Token }{tok}),
		"%#v":  fmt.Sprintf("%#v", tok),
		"json": string(js),
	} {
		if strings.Contains(s, "hunter2") {
			t.Errorf("%s leaks the token: %s", name, s)
		}
	}
}

func TestTokenEqual(t *testing.T) {
	tests := []struct {
		tok, in string
		want    bool
	}{
		{"abc", "abc", true},
		{"abc", "abd", false},
		{"abc", "ab", false},
		{"", "", true},
		{"abc", "", false},
	}
	for _, tt := range tests {
		if got := New(tt.tok).Equal(tt.in); got != tt.want {
			t.Errorf("New(%q).Equal(%q) = %v, want %v", tt.tok, tt.in, got, tt.want)
		}
	}
}
