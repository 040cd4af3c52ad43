package core

import (
	"encoding/json"
	"slices"
	"strings"

	"github.com/asdispatch/asdispatch/txnstore"
)

// The MSC3202 items (device list news, key counts) are stored as small JSON
// objects of this package's own layout and coalesced when a body is built:
// unlike events, the AS wants the latest state, not every change. Their
// body fields are objects keyed by user (and device), so they cannot be
// copied in as they are: encode decodes them, keeps the latest per user or
// device, and writes the fields out sorted, so the same items always give
// the same bytes.

// deviceListItem is the Data of a txnstore.KindDeviceList item.
type deviceListItem struct {
	UserID string `json:"user_id"`
	Left   bool   `json:"left,omitempty"`
}

// keyCountsItem is the Data of a txnstore.KindKeyCounts item. Both values
// are kept as the bytes KeyCountsData wrote: compact and sorted.
type keyCountsItem struct {
	UserID   string          `json:"user_id"`
	DeviceID string          `json:"device_id"`
	OTK      json.RawMessage `json:"one_time_keys_count"`
	Fallback json.RawMessage `json:"unused_fallback_key_types"`
}

// DeviceListData is the Data of a KindDeviceList item: userID's devices or
// keys changed, or (left) the AS's users no longer share a room with userID.
func DeviceListData(userID string, left bool) []byte {
	b, _ := json.Marshal(deviceListItem{UserID: userID, Left: left}) // cannot fail: strings and a bool
	return b
}

// KeyCountsData is the Data of a KindKeyCounts item: the unclaimed one-time
// keys of one device per algorithm and the algorithms of its unused fallback
// keys.
func KeyCountsData(userID, deviceID string, otk map[string]int, fallback []string) []byte {
	if otk == nil {
		otk = map[string]int{}
	}
	fb := slices.Clone(fallback)
	if fb == nil {
		fb = []string{}
	}
	slices.Sort(fb)
	fb = slices.Compact(fb)
	o, _ := json.Marshal(otk) // map keys come out sorted
	f, _ := json.Marshal(fb)
	b, _ := json.Marshal(keyCountsItem{UserID: userID, DeviceID: deviceID, OTK: o, Fallback: f})
	return b
}

// Body keys of the MSC3202 fields, as Synapse sends them and mautrix-go
// and matrix-bot-sdk read them. Synapse also sends the counts under the
// older spelling ("key_counts") that SDKs before Synapse 1.73 read.
const (
	keyDeviceLists  = "org.matrix.msc3202.device_lists"
	keyOTKCount     = "org.matrix.msc3202.device_one_time_keys_count"
	keyOTKCountsOld = "org.matrix.msc3202.device_one_time_key_counts"
	keyFallback     = "org.matrix.msc3202.device_unused_fallback_key_types"
)

// msc3202Overhead bounds the bytes the MSC3202 keys and their braces add to
// a body; cut counts it once a body holds any MSC3202 item.
const msc3202Overhead = len(keyDeviceLists) + len(`,"":{"changed":[],"left":[]}`) +
	len(keyOTKCount) + len(keyOTKCountsOld) + len(keyFallback) + 3*len(`,"":{}`)

// keyCountsFactor bounds the body bytes of a key counts item against its
// Data: user and device IDs appear under three keys (Data holds them once,
// with 45 bytes of field names), the counts twice, the fallback types once.
const keyCountsFactor = 3

// appendDeviceLists writes the device_lists field: each user once, as the
// latest item about them says. Nothing if no item decodes.
func appendDeviceLists(b []byte, items []txnstore.Item) []byte {
	latest := map[string]bool{}
	for _, it := range items {
		if it.Kind != txnstore.KindDeviceList {
			continue
		}
		var d deviceListItem
		if json.Unmarshal(it.Data, &d) != nil || d.UserID == "" {
			continue // not written by DeviceListData: never sent
		}
		latest[d.UserID] = d.Left
	}
	if len(latest) == 0 {
		return b
	}
	var changed, left []string
	for u, l := range latest {
		if l {
			left = append(left, u)
		} else {
			changed = append(changed, u)
		}
	}
	slices.Sort(changed)
	slices.Sort(left)
	b = append(b, `,"`+keyDeviceLists+`":{"changed":`...)
	b = appendStrings(b, changed)
	b = append(b, `,"left":`...)
	b = appendStrings(b, left)
	return append(b, '}')
}

// appendKeyCounts writes the counts (under both spellings) and the fallback
// key types: the latest item of each device. Nothing if no item decodes.
func appendKeyCounts(b []byte, items []txnstore.Item) []byte {
	type dev struct{ user, device string }
	latest := map[dev]keyCountsItem{}
	for _, it := range items {
		if it.Kind != txnstore.KindKeyCounts {
			continue
		}
		var k keyCountsItem
		if json.Unmarshal(it.Data, &k) != nil || k.UserID == "" || k.DeviceID == "" ||
			!validObject(k.OTK, '{') || !validObject(k.Fallback, '[') {
			continue // not written by KeyCountsData: never sent
		}
		latest[dev{k.UserID, k.DeviceID}] = k
	}
	if len(latest) == 0 {
		return b
	}
	devs := make([]dev, 0, len(latest))
	for d := range latest {
		devs = append(devs, d)
	}
	slices.SortFunc(devs, func(a, b dev) int {
		if c := strings.Compare(a.user, b.user); c != 0 {
			return c
		}
		return strings.Compare(a.device, b.device)
	})
	field := func(b []byte, key string, value func(keyCountsItem) json.RawMessage) []byte {
		b = append(b, `,"`+key+`":{`...)
		for i, d := range devs {
			if i == 0 || devs[i-1].user != d.user {
				if i > 0 {
					b = append(b, "},"...)
				}
				b = appendString(b, d.user)
				b = append(b, ":{"...)
			} else {
				b = append(b, ',')
			}
			b = appendString(b, d.device)
			b = append(b, ':')
			b = append(b, value(latest[d])...)
		}
		return append(b, "}}"...)
	}
	otk := func(k keyCountsItem) json.RawMessage { return k.OTK }
	b = field(b, keyOTKCount, otk)
	b = field(b, keyOTKCountsOld, otk)
	return field(b, keyFallback, func(k keyCountsItem) json.RawMessage { return k.Fallback })
}

// validObject reports whether raw is valid JSON opening with open: a value
// that goes into a body as is must not break it.
func validObject(raw json.RawMessage, open byte) bool {
	return len(raw) > 0 && raw[0] == open && json.Valid(raw)
}

func appendStrings(b []byte, ss []string) []byte {
	b = append(b, '[')
	for i, s := range ss {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, s)
	}
	return append(b, ']')
}

func appendString(b []byte, s string) []byte {
	q, _ := json.Marshal(s) // a string always marshals
	return append(b, q...)
}

// Fields lists the body keys a transaction may carry for an AS with format
// f that opted in to MSC3202 (or not), in the order encode writes them.
func Fields(f Format, msc3202 bool, toDevice bool) []string {
	out := []string{"events"}
	if f&EphemeralStable != 0 {
		out = append(out, "ephemeral")
	}
	if f&EphemeralUnstable != 0 {
		out = append(out, "de.sorunome.msc2409.ephemeral")
	}
	if toDevice {
		out = append(out, "de.sorunome.msc2409.to_device")
	}
	if msc3202 {
		out = append(out, keyDeviceLists, keyOTKCount, keyOTKCountsOld, keyFallback)
	}
	return out
}
