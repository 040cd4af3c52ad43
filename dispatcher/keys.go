package dispatcher

import (
	"context"
	"fmt"
	"slices"

	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/txnstore"
)

// DeviceList is news about one user's devices for the ASes that opted in to
// MSC3202 (org.matrix.msc3202: true) and whose users share a room with the
// user: "changed" when the user's devices or keys changed or the user
// joined a room, "left" when the user left the last room it shared with the
// AS's users. The homeserver submits it after the change is committed (and,
// for a membership change, after Submit of the membership event).
//
// Sharing a room means a local joined member of the room that the AS's
// users namespace covers, as the dispatcher follows them from membership
// events; the AS that owns UserID always gets its own user's changes.
type DeviceList struct {
	UserID string
	// Rooms are the rooms UserID is joined to now. Without Left, the news
	// is "changed" for every AS with a user in one of them: UserID's
	// devices or keys changed, or UserID joined one of them (the ASes of
	// its other rooms then hear of it too; a needless "changed" only costs
	// the AS a key query).
	Rooms []string
	// Left are the rooms UserID has just left (or was kicked or banned
	// from): the news is "left" for every AS with a user in one of them
	// that neither owns UserID nor shares one of Rooms with it.
	Left []string
	// Viewer, if set, is an AS's user whose own membership changed in a
	// room UserID is joined to: the news goes only to the ASes whose users
	// namespace covers Viewer, instead of those with a user in the rooms.
	// Viewer joined: "changed" (the AS now shares a room with UserID).
	// Viewer left one of Left: "left", unless the AS owns UserID or still
	// has a user in one of Rooms (UserID's rooms).
	Viewer string
}

// KeyCounts are one device's unclaimed one-time keys per algorithm and the
// algorithms of its unused fallback keys, after an upload or a claim. They
// go to the MSC3202 ASes whose users namespace covers UserID; a transaction
// carries only the latest counts of each device.
type KeyCounts struct {
	UserID, DeviceID string
	OneTimeKeys      map[string]int
	UnusedFallback   []string
}

// SubmitDeviceLists queues device list news (see DeviceList) and returns
// once it is durable. The news rides in each AS's stream with its events.
func (d *Dispatcher) SubmitDeviceLists(ctx context.Context, news ...DeviceList) error {
	if d.closed.Load() {
		return ErrClosed
	}
	v := d.view.Load()
	var sc scratch
	entries := make([]txnstore.Entry, 0, len(news))
	for i := range news {
		n := &news[i]
		if n.UserID == "" || len(n.UserID) > maxIDBytes {
			return fmt.Errorf("dispatcher: device list of %.100q: %w", n.UserID, ErrInvalidID)
		}
		if len(n.Viewer) > maxIDBytes {
			return fmt.Errorf("dispatcher: device list viewer %.100q: %w", n.Viewer, ErrInvalidID)
		}
		var viewers []int32
		if n.Viewer != "" {
			sc.userOwners(v.set, n.Viewer)
			viewers = slices.Clone(sc.idx)
		}
		sc.userOwners(v.set, n.UserID)
		if n.Viewer != "" && len(n.Left) == 0 {
			if t := v.targets(viewers, v.push, v.msc3202); len(t) > 0 {
				entries = append(entries, txnstore.Entry{Kind: txnstore.KindDeviceList, Data: queue.DeviceListData(n.UserID, false), Targets: t})
			}
			continue
		}
		var err error
		if sc.idx, err = v.rooms.memberASes(ctx, sc.idx, n.Rooms); err != nil {
			return fmt.Errorf("dispatcher: device list of %s: %w", n.UserID, err)
		}
		if len(n.Left) == 0 {
			if t := v.targets(sc.idx, v.push, v.msc3202); len(t) > 0 {
				entries = append(entries, txnstore.Entry{Kind: txnstore.KindDeviceList, Data: queue.DeviceListData(n.UserID, false), Targets: t})
			}
			continue
		}
		// Those left behind: with a user in a room UserID left, but
		// neither owning UserID nor sharing a room with it still.
		gone := viewers
		if n.Viewer == "" {
			if gone, err = v.rooms.memberASes(ctx, nil, n.Left); err != nil {
				return fmt.Errorf("dispatcher: device list of %s: %w", n.UserID, err)
			}
		}
		gone = slices.DeleteFunc(gone, func(i int32) bool { return slices.Contains(sc.idx, i) })
		if t := v.targets(gone, v.push, v.msc3202); len(t) > 0 {
			entries = append(entries, txnstore.Entry{Kind: txnstore.KindDeviceList, Data: queue.DeviceListData(n.UserID, true), Targets: t})
		}
	}
	return d.append(ctx, entries)
}

// SubmitKeyCounts queues key counts (see KeyCounts) and returns once they
// are durable.
func (d *Dispatcher) SubmitKeyCounts(ctx context.Context, counts ...KeyCounts) error {
	if d.closed.Load() {
		return ErrClosed
	}
	v := d.view.Load()
	var sc scratch
	entries := make([]txnstore.Entry, 0, len(counts))
	for i := range counts {
		kc := &counts[i]
		if kc.UserID == "" || kc.DeviceID == "" || len(kc.UserID) > maxIDBytes || len(kc.DeviceID) > maxIDBytes {
			return fmt.Errorf("dispatcher: key counts of %.100q %.100q: %w", kc.UserID, kc.DeviceID, ErrInvalidID)
		}
		sc.userOwners(v.set, kc.UserID)
		if t := v.targets(sc.idx, v.push, v.msc3202); len(t) > 0 {
			entries = append(entries, txnstore.Entry{Kind: txnstore.KindKeyCounts,
				Data: queue.KeyCountsData(kc.UserID, kc.DeviceID, kc.OneTimeKeys, kc.UnusedFallback), Targets: t})
		}
	}
	return d.append(ctx, entries)
}

// memberASes appends the ASes with a local joined member in one of rooms
// (members their users namespace covers) to idx.
func (rs *rooms) memberASes(ctx context.Context, idx []int32, rooms []string) ([]int32, error) {
	for _, roomID := range rooms {
		h, err := rs.acquire(ctx, roomID)
		if err != nil {
			return idx, err
		}
		for _, ases := range h.r.members {
			idx = append(idx, ases...)
		}
		rs.release(&h)
	}
	return idx, nil
}
