package core

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/asdispatch/asdispatch/txnstore"
)

func items(kinds string) []txnstore.Item {
	out := make([]txnstore.Item, len(kinds))
	for i, k := range kinds {
		kind := map[rune]txnstore.Kind{'e': txnstore.KindEvent, 'p': txnstore.KindEphemeral, 't': txnstore.KindToDevice}[k]
		out[i] = txnstore.Item{Seq: int64(i + 1), Kind: kind, Data: []byte(`{"n":` + string(rune('0'+i%10)) + `}`)}
	}
	return out
}

func TestEncode(t *testing.T) {
	tests := []struct {
		name  string
		kinds string
		f     Format
		want  string
	}{
		{"events only", "ee", 0, `{"events":[{"n":0},{"n":1}]}`},
		{"empty still has events", "", 0, `{"events":[]}`},
		{"stable ephemeral", "ep", EphemeralStable, `{"events":[{"n":0}],"ephemeral":[{"n":1}]}`},
		{"unstable ephemeral", "ep", EphemeralUnstable, `{"events":[{"n":0}],"de.sorunome.msc2409.ephemeral":[{"n":1}]}`},
		{"both", "p", EphemeralStable | EphemeralUnstable, `{"events":[],"ephemeral":[{"n":0}],"de.sorunome.msc2409.ephemeral":[{"n":0}]}`},
		{"to-device", "te", EphemeralStable, `{"events":[{"n":1}],"de.sorunome.msc2409.to_device":[{"n":0}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := string(encode(items(tt.kinds), tt.f))
			if got != tt.want {
				t.Errorf("encode = %s, want %s", got, tt.want)
			}
			if !json.Valid([]byte(got)) {
				t.Errorf("not JSON: %s", got)
			}
		})
	}
}

func TestCut(t *testing.T) {
	big := []txnstore.Item{{Seq: 1, Data: []byte(strings.Repeat("x", 5000))}, {Seq: 2, Data: []byte("{}")}}
	tests := []struct {
		name  string
		items []txnstore.Item
		lim   limits
		want  int
	}{
		{"all fit", items("eeepppttt"), limits{100, 100, 100, 1 << 20}, 9},
		{"event cap", items("eeeee"), limits{3, 100, 100, 1 << 20}, 3},
		{"ephemeral cap stops the range", items("ppepp"), limits{100, 2, 100, 1 << 20}, 3},
		{"to-device cap", items("ttt"), limits{100, 100, 1, 1 << 20}, 1},
		{"byte cap", items("eeeeeeeeee"), limits{100, 100, 100, bodyOverhead + 3*9}, 3},
		{"oversized first item travels alone", big, limits{100, 100, 100, 1000}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := cut(tt.items, tt.lim, 0); got != tt.want {
				t.Errorf("cut = %d, want %d", got, tt.want)
			}
		})
	}
}

func TestCutBoundsEncodedSize(t *testing.T) {
	its := items(strings.Repeat("eppt", 50))
	for _, f := range []Format{0, EphemeralStable, EphemeralUnstable, EphemeralStable | EphemeralUnstable} {
		lim := limits{100, 100, 100, 700}
		for rest := its; len(rest) > 0; {
			n := cut(rest, lim, f)
			if body := encode(rest[:n], f); n > 1 && len(body) > lim.bytes {
				t.Fatalf("format %d: %d items encode to %d bytes, cap %d", f, n, len(body), lim.bytes)
			}
			rest = rest[n:]
		}
	}
}

func BenchmarkEncode(b *testing.B) {
	its := make([]txnstore.Item, 100)
	for i := range its {
		its[i] = txnstore.Item{Seq: int64(i), Kind: txnstore.KindEvent, Data: []byte(strings.Repeat("x", 500))}
	}
	b.SetBytes(100 * 500)
	for i := 0; i < b.N; i++ {
		encode(its, 0)
	}
}

// FuzzEncode: whatever valid JSON objects go in, the body is valid JSON
// holding exactly those items under the right keys, and cut never exceeds
// the caps.
func FuzzEncode(f *testing.F) {
	f.Add([]byte(`{"a":1}`), []byte(`{"b":"é"}`), uint8(3), uint32(1))
	f.Add([]byte(`{}`), []byte(`{"x":[1,{"y":null}]}`), uint8(0), uint32(3))
	f.Fuzz(func(t *testing.T, a, b []byte, kinds uint8, format uint32) {
		if !json.Valid(a) || !json.Valid(b) || len(a) == 0 || len(b) == 0 || a[0] != '{' || b[0] != '{' {
			t.Skip()
		}
		its := []txnstore.Item{
			{Seq: 1, Kind: txnstore.Kind(kinds%3 + 1), Data: a},
			{Seq: 2, Kind: txnstore.Kind(kinds/3%3 + 1), Data: b},
		}
		ff := Format(format % 4)
		body := encode(its, ff)
		var parsed map[string][]json.RawMessage
		if err := json.Unmarshal(body, &parsed); err != nil {
			t.Fatalf("invalid body %s: %v", body, err)
		}
		n := len(parsed["events"]) + len(parsed["de.sorunome.msc2409.to_device"])
		if len(parsed["ephemeral"]) > 0 {
			n += len(parsed["ephemeral"])
		} else {
			n += len(parsed["de.sorunome.msc2409.ephemeral"])
		}
		if n != 2 {
			t.Fatalf("body %s holds %d items, want 2", body, n)
		}
		if c := cut(its, limits{1, 1, 1, 1}, ff); c < 1 || c > 2 {
			t.Fatalf("cut = %d", c)
		}
	})
}
