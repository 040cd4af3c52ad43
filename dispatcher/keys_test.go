package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"sync"
	"testing"

	"github.com/asdispatch/asdispatch/txnstore"
)

// TestDeviceListTargets: device list news and key counts go only to ASes
// that opted in to MSC3202, changes to those sharing a room with the user
// or owning it, "left" to those the user no longer shares a room with.
func TestDeviceListTargets(t *testing.T) {
	state := &roomState{members: map[string][]string{
		"!a:hs": {"@irc_1:hs", "@alice:hs"},
		"!b:hs": {"@tg_1:hs", "@alice:hs"},
		"!c:hs": {"@irc_2:hs", "@pl_1:hs", "@bob:hs"},
	}}
	var mu sync.Mutex
	var got []txnstore.Entry
	hook := func(entries []txnstore.Entry) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, entries...)
		return nil
	}
	const msc3202 = "org.matrix.msc3202: true\n"
	url := newRecorder(t).srv.URL
	d := hookedDispatcher(t, state, 100, hook,
		registration("irc", url, "@irc_.*", "", "", true)+msc3202,
		registration("tg", url, "@tg_.*", "", "", false)+msc3202,
		registration("pl", url, "@pl_.*", "", "", true))
	ctx := context.Background()
	sts, err := d.Statuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ids := map[txnstore.ASKey]string{}
	for _, st := range sts {
		ids[st.Key] = st.ID
	}
	// take returns what the call appended: per AS, "changed" or "left"
	// of user, or "counts" of user and device.
	take := func() map[string][]string {
		mu.Lock()
		defer mu.Unlock()
		out := map[string][]string{}
		for _, e := range got {
			var it struct {
				UserID   string `json:"user_id"`
				DeviceID string `json:"device_id"`
				Left     bool   `json:"left"`
			}
			if err := json.Unmarshal(e.Data, &it); err != nil {
				t.Fatal(err)
			}
			what := "changed " + it.UserID
			switch {
			case e.Kind == txnstore.KindKeyCounts:
				what = "counts " + it.UserID + " " + it.DeviceID
			case it.Left:
				what = "left " + it.UserID
			}
			for _, k := range e.Targets {
				out[ids[k]] = append(out[ids[k]], what)
			}
		}
		got = nil
		return out
	}
	type m = map[string][]string
	tests := []struct {
		name   string
		news   *DeviceList
		counts *KeyCounts
		want   m
	}{
		{name: "devices changed: ASes sharing a room", news: &DeviceList{UserID: "@alice:hs", Rooms: []string{"!a:hs", "!b:hs"}},
			want: m{"irc": {"changed @alice:hs"}, "tg": {"changed @alice:hs"}}},
		{name: "an AS not opted in hears nothing", news: &DeviceList{UserID: "@bob:hs", Rooms: []string{"!c:hs"}},
			want: m{"irc": {"changed @bob:hs"}}},
		{name: "an AS hears of its own users", news: &DeviceList{UserID: "@tg_9:hs"}, want: m{"tg": {"changed @tg_9:hs"}}},
		{name: "nobody shares a room", news: &DeviceList{UserID: "@carol:hs", Rooms: []string{"!d:hs"}}, want: m{}},
		{name: "left a room shared with one AS only", news: &DeviceList{UserID: "@alice:hs", Rooms: []string{"!b:hs"}, Left: []string{"!a:hs"}},
			want: m{"irc": {"left @alice:hs"}}},
		{name: "left, but still shares another room", news: &DeviceList{UserID: "@bob:hs", Rooms: []string{"!a:hs"}, Left: []string{"!c:hs"}}, want: m{}},
		{name: "an owner never hears its user left", news: &DeviceList{UserID: "@irc_1:hs", Left: []string{"!a:hs", "!c:hs"}}, want: m{}},
		{name: "left the last room", news: &DeviceList{UserID: "@bob:hs", Left: []string{"!c:hs"}}, want: m{"irc": {"left @bob:hs"}}},
		{name: "an AS's user joined a room of the user", news: &DeviceList{UserID: "@bob:hs", Viewer: "@tg_1:hs", Rooms: []string{"!c:hs"}},
			want: m{"tg": {"changed @bob:hs"}}},
		{name: "an AS's user left the last room shared with the user", news: &DeviceList{UserID: "@bob:hs", Viewer: "@tg_1:hs", Rooms: []string{"!c:hs"}, Left: []string{"!b:hs"}},
			want: m{"tg": {"left @bob:hs"}}},
		{name: "an AS's user left, another still shares a room", news: &DeviceList{UserID: "@alice:hs", Viewer: "@irc_2:hs", Rooms: []string{"!a:hs"}, Left: []string{"!c:hs"}},
			want: m{}},
		{name: "a viewer no MSC3202 AS covers", news: &DeviceList{UserID: "@bob:hs", Viewer: "@pl_1:hs"}, want: m{}},
		{name: "counts go to the owner", counts: &KeyCounts{UserID: "@irc_1:hs", DeviceID: "D", OneTimeKeys: map[string]int{"signed_curve25519": 3}},
			want: m{"irc": {"counts @irc_1:hs D"}}},
		{name: "counts of a user no MSC3202 AS owns", counts: &KeyCounts{UserID: "@pl_1:hs", DeviceID: "D"}, want: m{}},
		{name: "counts of a regular user", counts: &KeyCounts{UserID: "@alice:hs", DeviceID: "D"}, want: m{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var err error
			if tt.news != nil {
				err = d.SubmitDeviceLists(ctx, *tt.news)
			} else {
				err = d.SubmitKeyCounts(ctx, *tt.counts)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := take(); !maps.EqualFunc(got, tt.want, slices.Equal) {
				t.Errorf("got %v, want %v", got, tt.want)
			}
		})
	}
	if err := d.SubmitKeyCounts(ctx, KeyCounts{UserID: "@irc_1:hs"}); !errors.Is(err, ErrInvalidID) {
		t.Errorf("counts without a device: %v, want ErrInvalidID", err)
	}
}
