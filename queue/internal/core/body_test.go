package core

import (
	"bytes"
	"encoding/json"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

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

// msc3202 builds device list (d: changed, l: left) and key counts (k)
// items from a script: "d@a" "l@b" "k@a/DEV=5" (5 signed curve25519 keys,
// no fallback key) "k@a/DEV=5+f" (and an unused fallback key).
func msc3202(script ...string) []txnstore.Item {
	out := make([]txnstore.Item, len(script))
	for i, s := range script {
		it := txnstore.Item{Seq: int64(i + 1)}
		switch s[0] {
		case 'd', 'l':
			it.Kind, it.Data = txnstore.KindDeviceList, DeviceListData(s[1:], s[0] == 'l')
		case 'k':
			user, rest, _ := strings.Cut(s[1:], "/")
			dev, count, _ := strings.Cut(rest, "=")
			count, fb := strings.CutSuffix(count, "+f")
			n, _ := strconv.Atoi(count)
			var fallback []string
			if fb {
				fallback = []string{"signed_curve25519"}
			}
			it.Kind, it.Data = txnstore.KindKeyCounts, KeyCountsData(user, dev, map[string]int{"signed_curve25519": n}, fallback)
		default:
			it.Kind, it.Data = txnstore.KindEvent, []byte(`{"n":`+strconv.Itoa(i)+`}`)
		}
		out[i] = it
	}
	return out
}

func TestEncodeMSC3202(t *testing.T) {
	const dl, otk, old, fb = `,"org.matrix.msc3202.device_lists":`, `,"org.matrix.msc3202.device_one_time_keys_count":`,
		`,"org.matrix.msc3202.device_one_time_key_counts":`, `,"org.matrix.msc3202.device_unused_fallback_key_types":`
	counts := func(c, f string) string { return otk + c + old + c + fb + f }
	tests := []struct {
		name   string
		script []string
		want   string
	}{
		{"changed once though reported twice", []string{"d@b", "e", "d@a", "d@b"},
			`{"events":[{"n":1}]` + dl + `{"changed":["@a","@b"],"left":[]}}`},
		{"the latest news of a user wins", []string{"d@a", "l@a", "l@b", "d@b"},
			`{"events":[]` + dl + `{"changed":["@b"],"left":["@a"]}}`},
		{"latest counts per device", []string{"k@a/X=5+f", "k@a/Y=1", "k@a/X=4", "k@b/Z=9+f"},
			`{"events":[]` + counts(`{"@a":{"X":{"signed_curve25519":4},"Y":{"signed_curve25519":1}},"@b":{"Z":{"signed_curve25519":9}}}`,
				`{"@a":{"X":[],"Y":[]},"@b":{"Z":["signed_curve25519"]}}`) + `}`},
		{"both", []string{"k@a/X=0", "l@c"},
			`{"events":[]` + dl + `{"changed":[],"left":["@c"]}` + counts(`{"@a":{"X":{"signed_curve25519":0}}}`, `{"@a":{"X":[]}}`) + `}`},
		{"no MSC3202 items, no fields", []string{"e"}, `{"events":[{"n":0}]}`},
		{"an item not of our layout is left out", nil, `{"events":[]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			its := msc3202(tt.script...)
			if tt.script == nil {
				its = []txnstore.Item{{Seq: 1, Kind: txnstore.KindDeviceList, Data: []byte(`{"x":1}`)},
					{Seq: 2, Kind: txnstore.KindKeyCounts, Data: []byte(`{"user_id":"@a","device_id":"X","one_time_keys_count":null}`)}}
			}
			got := string(encode(its, EphemeralStable))
			if got != tt.want {
				t.Errorf("encode =\n%s\nwant\n%s", got, tt.want)
			}
			if !json.Valid([]byte(got)) {
				t.Errorf("not JSON: %s", got)
			}
		})
	}
}

func TestCutMSC3202(t *testing.T) {
	tests := []struct {
		name   string
		script []string
		lim    limits
		want   int
	}{
		{"all fit", []string{"d@a", "k@a/X=1", "e", "l@b"}, limits{100, 100, 100, 1 << 20, 100}, 4},
		{"device list cap counts items before coalescing", []string{"d@a", "d@a", "k@a/X=1", "d@b"}, limits{100, 100, 100, 1 << 20, 2}, 3},
		{"key counts cap apart from device lists", []string{"k@a/X=1", "d@a", "k@a/X=2", "k@a/X=3"}, limits{100, 100, 100, 1 << 20, 2}, 3},
		{"their keys count against the byte cap", []string{"e", "d@a"}, limits{100, 100, 100, bodyOverhead + 8 + msc3202Overhead, 100}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := cut(msc3202(tt.script...), tt.lim, 0); got != tt.want {
				t.Errorf("cut = %d, want %d", got, tt.want)
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
		{"all fit", items("eeepppttt"), limits{100, 100, 100, 1 << 20, 100}, 9},
		{"event cap", items("eeeee"), limits{3, 100, 100, 1 << 20, 100}, 3},
		{"ephemeral cap stops the range", items("ppepp"), limits{100, 2, 100, 1 << 20, 100}, 3},
		{"to-device cap", items("ttt"), limits{100, 100, 1, 1 << 20, 100}, 1},
		{"byte cap", items("eeeeeeeeee"), limits{100, 100, 100, bodyOverhead + 3*9, 100}, 3},
		{"oversized first item travels alone", big, limits{100, 100, 100, 1000, 100}, 1},
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
	long := strings.Repeat("u", 200) // IDs longer than the field names weigh most in counts
	for i := 0; i < 50; i++ {
		its = append(its,
			txnstore.Item{Kind: txnstore.KindKeyCounts, Data: KeyCountsData("@"+long+strconv.Itoa(i%7), long, map[string]int{"signed_curve25519": i}, []string{"signed_curve25519"})},
			txnstore.Item{Kind: txnstore.KindDeviceList, Data: DeviceListData("@"+long+strconv.Itoa(i), i%3 == 0)},
			txnstore.Item{Kind: txnstore.KindEvent, Data: []byte(`{"n":1}`)})
	}
	for _, f := range []Format{0, EphemeralStable, EphemeralUnstable, EphemeralStable | EphemeralUnstable} {
		lim := limits{100, 100, 100, 2000, 100}
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
// holding exactly those items under the right keys, the MSC3202 fields hold
// each user once and the latest counts of each device, the same items give
// the same bytes, and cut never exceeds the caps.
func FuzzEncode(f *testing.F) {
	f.Add([]byte(`{"a":1}`), []byte(`{"b":"é"}`), uint8(3), uint32(1), "@a:hs", "@b:hs", "DEV", 3)
	f.Add([]byte(`{}`), []byte(`{"x":[1,{"y":null}]}`), uint8(0), uint32(3), "@a:hs", "@a:hs", "<\"&>", -1)
	f.Fuzz(func(t *testing.T, a, b []byte, kinds uint8, format uint32, u1, u2, dev string, n int) {
		if !json.Valid(a) || !json.Valid(b) || len(a) == 0 || len(b) == 0 || a[0] != '{' || b[0] != '{' {
			t.Skip()
		}
		if u1 == "" || u2 == "" || dev == "" || !utf8.ValidString(u1) || !utf8.ValidString(u2) || !utf8.ValidString(dev) {
			t.Skip()
		}
		its := []txnstore.Item{
			{Seq: 1, Kind: txnstore.Kind(kinds%3 + 1), Data: a},
			{Seq: 2, Kind: txnstore.Kind(kinds/3%3 + 1), Data: b},
			{Seq: 3, Kind: txnstore.KindDeviceList, Data: DeviceListData(u1, false)},
			{Seq: 4, Kind: txnstore.KindKeyCounts, Data: KeyCountsData(u1, dev, map[string]int{"signed_curve25519": n}, []string{"x"})},
			{Seq: 5, Kind: txnstore.KindDeviceList, Data: DeviceListData(u2, true)},
			{Seq: 6, Kind: txnstore.KindDeviceList, Data: DeviceListData(u1, n%2 == 0)},
			{Seq: 7, Kind: txnstore.KindKeyCounts, Data: KeyCountsData(u1, dev, map[string]int{"signed_curve25519": n + 1}, nil)},
		}
		ff := Format(format % 4)
		body := encode(its, ff)
		if again := encode(slices.Clone(its), ff); !bytes.Equal(body, again) {
			t.Fatalf("same items, two bodies:\n%s\n%s", body, again)
		}
		var parsed struct {
			Events      []json.RawMessage                    `json:"events"`
			Eph         []json.RawMessage                    `json:"ephemeral"`
			EphUnstable []json.RawMessage                    `json:"de.sorunome.msc2409.ephemeral"`
			ToDevice    []json.RawMessage                    `json:"de.sorunome.msc2409.to_device"`
			DeviceLists struct{ Changed, Left []string }     `json:"org.matrix.msc3202.device_lists"`
			OTK         map[string]map[string]map[string]int `json:"org.matrix.msc3202.device_one_time_keys_count"`
			OTKOld      map[string]map[string]map[string]int `json:"org.matrix.msc3202.device_one_time_key_counts"`
			Fallback    map[string]map[string][]string       `json:"org.matrix.msc3202.device_unused_fallback_key_types"`
		}
		if err := json.Unmarshal(body, &parsed); err != nil {
			t.Fatalf("invalid body %s: %v", body, err)
		}
		n2 := len(parsed.Events) + len(parsed.ToDevice)
		if len(parsed.Eph) > 0 {
			n2 += len(parsed.Eph)
		} else {
			n2 += len(parsed.EphUnstable)
		}
		if n2 != 2 {
			t.Fatalf("body %s holds %d items, want 2", body, n2)
		}
		seen := map[string]int{}
		for _, u := range append(parsed.DeviceLists.Changed, parsed.DeviceLists.Left...) {
			seen[u]++
		}
		wantUsers := map[string]int{u1: 1, u2: 1}
		if !maps.Equal(seen, wantUsers) {
			t.Fatalf("device lists %+v, want each of %q, %q once", parsed.DeviceLists, u1, u2)
		}
		if u1Left := slices.Contains(parsed.DeviceLists.Left, u1); u1 != u2 && u1Left != (n%2 == 0) {
			t.Fatalf("device lists %+v: %q left = %v, want the latest item's %v", parsed.DeviceLists, u1, u1Left, n%2 == 0)
		}
		if got := parsed.OTK[u1][dev]["signed_curve25519"]; got != n+1 || len(parsed.OTK) != 1 || len(parsed.OTK[u1]) != 1 {
			t.Fatalf("counts %v, want only %q %q at %d", parsed.OTK, u1, dev, n+1)
		}
		if !reflect.DeepEqual(parsed.OTK, parsed.OTKOld) {
			t.Fatalf("the two spellings of the counts differ: %v, %v", parsed.OTK, parsed.OTKOld)
		}
		if fb, ok := parsed.Fallback[u1][dev]; !ok || len(fb) != 0 {
			t.Fatalf("fallback types %v, want the latest: none left", parsed.Fallback)
		}
		lim := limits{1, 1, 1, 1, 1}
		for rest := its; len(rest) > 0; {
			c := cut(rest, lim, ff)
			if c < 1 || c > 2 {
				t.Fatalf("cut = %d", c)
			}
			rest = rest[c:]
		}
		if c := cut(its, limits{100, 100, 100, 1 << 20, 100}, ff); c != len(its) {
			t.Fatalf("cut = %d under generous caps, want all %d", c, len(its))
		} else if len(body) > 1<<20 && len(its) > 1 {
			t.Fatalf("body of %d bytes over the cap", len(body))
		}
	})
}
