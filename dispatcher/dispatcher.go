package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/namespace"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
	"github.com/asdispatch/asdispatch/txnstore"
)

// Config configures a Dispatcher.
type Config struct {
	// Registry holds the current registration set. Required.
	Registry *registry.Registry
	// DataDir holds the SQLite store (dispatcher.db); ignored when OpenStore
	// is set. Created if missing.
	DataDir string
	// OpenStore, if set, opens the store instead of SQLite in DataDir. It
	// must pass opts on to the store.
	OpenStore func(ctx context.Context, opts txnstore.Options) (txnstore.Store, error)
	// RoomState answers for rooms whose interest is not cached. Without it,
	// room interest comes only from the membership events the dispatcher
	// sees, and no alias counts.
	RoomState RoomState
	// RoomCacheSize bounds the rooms whose interest is kept (default 100,000).
	RoomCacheSize int
	Queue         queue.Options
	Logger        *zap.Logger
	// Metrics, if set, records submissions and watches backlogs; it is
	// passed on to the queues unless Queue.Metrics is set.
	Metrics *metrics.Metrics
	// Websocket says that ASes registered with `url: null` are reached over
	// their appservice websocket (package asws, with Queue.Client given
	// its Sockets): their events are queued like any AS's, sent while a
	// socket is open, and wait durably, as for an AS that is down, while
	// none is. Without it a `url: null` AS gets nothing queued.
	Websocket bool
}

// stopTimeout bounds the wait for a removed AS's send in flight.
const stopTimeout = 10 * time.Second

// ErrInvalidJSON rejects an item whose JSON is not one valid JSON object in
// UTF-8:
// queued, it would make every transaction carrying it fail at the AS and
// block that AS for good.
var ErrInvalidJSON = errors.New("not a valid JSON object")

func checkJSON(b []byte) error {
	if len(b) == 0 || b[0] != '{' || !utf8.Valid(b) || !json.Valid(b) {
		return ErrInvalidJSON
	}
	return nil
}

// ErrInvalidID rejects an event whose sender, room ID or member state_key is
// longer than Matrix's 255-byte limit on identifiers: the homeserver should
// never produce one, and matching them would cost more than any real ID.
var ErrInvalidID = errors.New("identifier longer than Matrix's 255-byte limit")

// ErrAllDevices refuses a to-device message for device "*": only the
// homeserver knows the user's devices, so it sends one message per device.
// Passed on as it is, the message would be dropped by the AS (mautrix-go
// looks for a device of that id).
var ErrAllDevices = errors.New(`to-device message for device "*": send one per device of the user`)

const maxIDBytes = 255

func checkIDs(ev *Event) error {
	if len(ev.Sender) > maxIDBytes || len(ev.RoomID) > maxIDBytes ||
		(ev.StateKey != nil && ev.Type == "m.room.member" && len(*ev.StateKey) > maxIDBytes) {
		return ErrInvalidID
	}
	return nil
}

// ErrClosed is returned by calls after Close.
var ErrClosed = errors.New("dispatcher: closed")

// Status is one AS's delivery state for operators.
type Status struct {
	txnstore.Status
	// Registered is false for an AS removed from the registrations: its
	// queue is kept, paused, until it comes back.
	Registered bool
	// InFlight is the id of the transaction being sent, if any.
	InFlight int64
}

// view is everything derived from one registration Set.
type view struct {
	set  *registry.Set
	keys []txnstore.ASKey // by AS index
	push []bool           // the AS has a URL
	eph  []bool           // the AS receives ephemeral events and to-device messages
	// msc3202 marks ASes that get device lists and key counts.
	msc3202 []bool
	rooms   *rooms
}

// Dispatcher is safe for concurrent use.
type Dispatcher struct {
	cfg    Config
	log    *zap.Logger
	store  txnstore.Store
	queues *queue.Queues
	view   atomic.Pointer[view]
	closed atomic.Bool

	reloadMu sync.Mutex
	// locks serializes the calls on one room, across reloads.
	locks *roomLocks
	// streams holds the homeserver streams handed over with positions.
	streams streamTable
	// scratch recycles Interested's buffers, called once per event.
	scratch sync.Pool
}

// New opens the store and starts a sender for every AS of the registry's
// current set.
func New(ctx context.Context, cfg Config) (*Dispatcher, error) {
	if cfg.Registry == nil || cfg.Registry.Current() == nil {
		return nil, errors.New("dispatcher: Config.Registry with a current set is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	if cfg.RoomCacheSize <= 0 {
		cfg.RoomCacheSize = 100_000
	}
	if cfg.Queue.Logger == nil {
		cfg.Queue.Logger = cfg.Logger
	}
	d := &Dispatcher{cfg: cfg, log: cfg.Logger, locks: newRoomLocks()}
	// The store calls OnCommit; the queues need the store: close the loop
	// through d, which the store cannot call before the first Append.
	opts := txnstore.Options{OnCommit: func(c []txnstore.Committed) { d.queues.OnCommit(c) }}
	var err error
	if cfg.OpenStore != nil {
		d.store, err = cfg.OpenStore(ctx, opts)
	} else {
		if cfg.DataDir == "" {
			return nil, errors.New("dispatcher: Config.DataDir or Config.OpenStore is required")
		}
		if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
			return nil, fmt.Errorf("dispatcher: data dir: %w", err)
		}
		d.store, err = txnstore.Open(ctx, filepath.Join(cfg.DataDir, "dispatcher.db"), opts)
	}
	if err != nil {
		return nil, fmt.Errorf("dispatcher: open store: %w", err)
	}
	if cfg.Queue.Metrics == nil {
		cfg.Queue.Metrics = cfg.Metrics
	}
	d.queues = queue.New(d.store, cfg.Queue)
	cfg.Metrics.WatchBacklog(func(ctx context.Context) ([]metrics.Backlog, error) {
		sts, err := d.store.Statuses(ctx)
		out := make([]metrics.Backlog, len(sts))
		for i, st := range sts {
			out[i] = metrics.Backlog{AS: st.ID, Events: st.PendingItems, Txns: st.PendingTxns, OldestPending: st.OldestPending}
		}
		return out, err
	})
	if err := d.Reload(ctx, cfg.Registry.Current()); err != nil {
		_ = d.store.Close()
		return nil, err
	}
	return d, nil
}

// Reload makes set the current registration set: new ASes start receiving
// events from now, changed ones use their new URL and token from their next
// attempt, removed ones keep their queue on disk, paused, until they return.
func (d *Dispatcher) Reload(ctx context.Context, set *registry.Set) error {
	d.reloadMu.Lock()
	defer d.reloadMu.Unlock()
	all := set.All()
	v := &view{
		set:     set,
		keys:    make([]txnstore.ASKey, len(all)),
		push:    make([]bool, len(all)),
		eph:     make([]bool, len(all)),
		msc3202: make([]bool, len(all)),
		rooms:   newRooms(set, d.cfg.RoomState, d.cfg.RoomCacheSize, d.locks),
	}
	if err := ensureASes(ctx, d.store, all, v.keys); err != nil {
		return err
	}
	for i, as := range all {
		v.push[i] = as.HasURL || d.cfg.Websocket
		v.eph[i] = as.ReceiveEphemeral
		v.msc3202[i] = as.MSC3202
	}
	old := d.view.Swap(v)
	d.cfg.Registry.Swap(set)

	if old == nil {
		// Every sender's recovery in one query, not two queries and a
		// read per AS.
		if err := d.queues.Preload(ctx); err != nil {
			d.log.Warn("reading every sender's recovery at once failed; each reads its own", zap.Error(err))
		}
	}
	for i, as := range all {
		d.queues.Start(queueAS(as, v.keys[i], d.cfg.Websocket))
	}
	if old != nil {
		kept := keySet(v.keys)
		for i, key := range old.keys {
			if _, ok := kept[key]; !ok {
				id := old.set.All()[i].ID
				d.log.Warn("appservice removed from the registrations; its queue is kept, paused",
					zap.String("appservice", id))
				// The stop is ordered now, before a later Reload's Start;
				// a send in flight may take a transaction timeout to end:
				// do not hold the reload for it (Close waits for it).
				wait := d.queues.Halt(key)
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
					defer cancel()
					if err := wait(ctx); err != nil {
						d.log.Warn("stopping a removed appservice's sender abandoned its send in flight",
							zap.String("appservice", id), zap.Error(err))
					}
				}()
			}
		}
	}
	return nil
}

// keySet is keys as a set: asking a slice for each of 10,000 ASes made
// Statuses and Reload quadratic in the number of ASes.
func keySet(keys []txnstore.ASKey) map[txnstore.ASKey]struct{} {
	set := make(map[txnstore.ASKey]struct{}, len(keys))
	for _, k := range keys {
		set[k] = struct{}{}
	}
	return set
}

// ensureWorkers is how many EnsureAS calls are in flight at once: the
// store commits concurrent calls together, where one at a time would cost
// a commit (an fsync for a new AS) each, minutes for 10,000 ASes.
const ensureWorkers = 256

// ensureASes sets keys[i] to the store key of all[i], adding the ASes the
// store does not have yet.
func ensureASes(ctx context.Context, store txnstore.Store, all []*registry.AppService, keys []txnstore.ASKey) error {
	if me, ok := store.(txnstore.ManyEnsurer); ok {
		ids := make([]string, len(all))
		for i, as := range all {
			ids[i] = as.ID
		}
		got, err := me.EnsureASes(ctx, ids)
		if err != nil {
			return fmt.Errorf("dispatcher: reload: appservices: %w", err)
		}
		if len(got) != len(ids) {
			return fmt.Errorf("dispatcher: reload: appservices: the store returned %d keys for %d ids", len(got), len(ids))
		}
		copy(keys, got)
		return nil
	}
	g, ctx := errgroup.WithContext(ctx)
	g.SetLimit(ensureWorkers)
	for i, as := range all {
		g.Go(func() error {
			key, err := store.EnsureAS(ctx, as.ID)
			if err != nil {
				return fmt.Errorf("dispatcher: reload: appservice %s: %w", as.ID, err)
			}
			keys[i] = key
			return nil
		})
	}
	return g.Wait()
}

// format is the body layout of an AS: ephemeral events under the stable
// key, or under the unstable one only for an AS registered with an unstable
// flag, as Synapse does.
func format(as *registry.AppService) queue.Format {
	var f queue.Format
	if as.ReceiveEphemeral {
		if as.EphemeralUnstable {
			f |= queue.EphemeralUnstable
		} else {
			f |= queue.EphemeralStable
		}
	}
	return f
}

// Fields lists the transaction body keys the AS gets as registered (each
// only in a transaction with items for it).
func Fields(as *registry.AppService) []string {
	return queue.Fields(format(as), as.ReceiveEphemeral, as.MSC3202)
}

// queueAS is the sender's view of as; with websocket, a `url: null` AS is
// sent to asapi.SocketURL: over its socket, or failing as not connected.
func queueAS(as *registry.AppService, key txnstore.ASKey, websocket bool) queue.AS {
	f := format(as)
	t := asapi.Target{ID: as.ID, HSToken: as.HSToken, ASToken: as.ASToken, Legacy: as.Legacy}
	if as.HasURL {
		t.URL = as.URL
	} else if websocket {
		t.URL = asapi.SocketURL
	}
	return queue.AS{ID: as.ID, Key: key, Target: t, Format: f}
}

// Submit decides which ASes are interested in each event and returns once
// the events are durably queued for all of them. Events of one room must be
// submitted in their order; concurrent calls share commits.
//
// Events with a position (Event.At) at or below their stream's stored
// position are skipped: they were handed over before. The stream's
// position moves to the call's highest in the commit of its events, so a
// homeserver that replays its log after Position hands each event over
// once. Hand each stream over from one writer, in order, one call at a
// time: calls on one stream take turns, and an event a concurrent call
// overtook is queued without its position (at least once) rather than lost.
//
// A call is all or nothing: every event is checked before any is decided,
// each event is decided with its room's interest as the call's earlier
// events leave it (a message after a join sees the join), and the room
// interest the call changes is kept only once its events are committed.
// The call holds its rooms until then, so another call's events of those
// rooms are decided after and committed after its own: calls on different
// rooms share commits, calls on one room take turns.
func (d *Dispatcher) Submit(ctx context.Context, events ...Event) (err error) {
	if d.closed.Load() {
		return ErrClosed
	}
	var ats []Position
	for i := range events {
		if err := checkJSON(events[i].JSON); err != nil {
			return fmt.Errorf("dispatcher: event %.100s: %w", events[i].ID, err)
		}
		if err := checkIDs(&events[i]); err != nil {
			return fmt.Errorf("dispatcher: event %.100s: %w", events[i].ID, err)
		}
		if events[i].At != (Position{}) {
			if ats == nil {
				ats = make([]Position, len(events))
			}
			ats[i] = events[i].At
		}
	}
	ho, err := d.handOver(ctx, ats)
	if err != nil {
		return err
	}
	defer func() { ho.end(err) }()
	if ho != nil {
		kept := events[:0:0]
		for i := range events {
			if !ho.skipped(i) {
				kept = append(kept, events[i])
			}
		}
		if len(kept) < len(events) {
			// Only what is new: a replayed event must not change its
			// room's interest again.
			keep := make([]Position, 0, len(kept))
			for i := range events {
				if !ho.skipped(i) {
					keep = append(keep, ho.keep[i])
				}
			}
			events, ho.keep = kept, keep
		}
	}
	v := d.view.Load()
	held, err := v.rooms.acquireAll(ctx, events)
	if err != nil {
		return fmt.Errorf("dispatcher: %w", err)
	}
	defer func() {
		for i := range held {
			v.rooms.release(&held[i])
		}
	}()
	entries := make([]txnstore.Entry, 0, len(events))
	var sc scratch
	for i := range events {
		var h *heldRoom
		if events[i].RoomID != "" {
			j, _ := slices.BinarySearchFunc(held, events[i].RoomID, func(h heldRoom, id string) int { return strings.Compare(h.id, id) })
			h = &held[j]
		}
		targets := d.interest(v, &events[i], h, &sc)
		if e := ho.entry(i, txnstore.Entry{Kind: txnstore.KindEvent, Data: events[i].JSON, Targets: targets}); len(targets) > 0 || e.Stream != "" {
			entries = append(entries, e)
		}
	}
	if err := d.append(ctx, entries); err != nil {
		return err
	}
	for i := range held {
		if held[i].own {
			v.rooms.store(&held[i], held[i].r)
		}
	}
	return nil
}

// acquireAll locks the rooms of events, sorted by ID (the one lock order
// for every call), and reads their interest.
func (rs *rooms) acquireAll(ctx context.Context, events []Event) ([]heldRoom, error) {
	ids := make([]string, 0, 1)
	for i := range events {
		if id := events[i].RoomID; id != "" && (len(ids) == 0 || ids[len(ids)-1] != id) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	ids = slices.Compact(ids)
	held := make([]heldRoom, 0, len(ids))
	for _, id := range ids {
		h, err := rs.acquire(ctx, id)
		if err != nil {
			for i := range held {
				rs.release(&held[i])
			}
			return nil, err
		}
		held = append(held, h)
	}
	return held, nil
}

func (d *Dispatcher) append(ctx context.Context, entries []txnstore.Entry) error {
	if len(entries) == 0 {
		return nil
	}
	if _, err := d.store.Append(ctx, entries); err != nil {
		return fmt.Errorf("dispatcher: queue: %w", err)
	}
	if d.cfg.Metrics != nil {
		items, deliveries := 0, 0
		for _, e := range entries {
			if len(e.Targets) > 0 {
				items++
				deliveries += len(e.Targets)
			}
		}
		if items > 0 {
			d.cfg.Metrics.Submitted(kindName[entries[0].Kind], items, deliveries)
		}
	}
	return nil
}

var kindName = map[txnstore.Kind]string{txnstore.KindEvent: "event", txnstore.KindEphemeral: "ephemeral", txnstore.KindToDevice: "to_device",
	txnstore.KindDeviceList: "device_list", txnstore.KindKeyCounts: "key_counts"}

// scratch holds buffers reused across the events of one call.
type scratch struct {
	hits []namespace.Hit
	idx  []int32
}

// owners appends the owners of sc.hits to sc.idx.
func (sc *scratch) owners() {
	for _, h := range sc.hits {
		sc.idx = append(sc.idx, int32(h.Owner))
	}
}

// userOwners sets sc.idx to the ASes whose users namespace covers userID.
func (sc *scratch) userOwners(set *registry.Set, userID string) {
	sc.hits = set.UsersInterested(sc.hits[:0], userID)
	sc.idx = sc.idx[:0]
	sc.owners()
}

// interest returns the store keys of the ASes interested in ev, sorted,
// after applying ev to its room h (nil for an event without a room).
func (d *Dispatcher) interest(v *view, ev *Event, h *heldRoom, sc *scratch) []txnstore.ASKey {
	set := v.set
	sc.hits = set.UsersInterested(sc.hits[:0], ev.Sender)
	if ev.Type == "m.room.member" && ev.StateKey != nil {
		sc.hits = set.UsersInterested(sc.hits, *ev.StateKey)
	}
	sc.hits = set.RoomsInterested(sc.hits, ev.RoomID)
	sc.idx = sc.idx[:0]
	sc.owners()
	if h != nil {
		v.rooms.apply(h, ev)
		sc.idx = append(sc.idx, h.r.interested...)
	}
	return v.targets(sc.idx, v.push)
}

// decide is interest for one event, the room's change kept at once.
func (d *Dispatcher) decide(ctx context.Context, v *view, ev *Event, sc *scratch) ([]txnstore.ASKey, error) {
	if ev.RoomID == "" {
		return d.interest(v, ev, nil, sc), nil
	}
	h, err := v.rooms.acquire(ctx, ev.RoomID)
	if err != nil {
		return nil, err
	}
	defer v.rooms.release(&h)
	keys := d.interest(v, ev, &h, sc)
	if h.own {
		v.rooms.store(&h, h.r)
	}
	return keys, nil
}

// Interested returns the IDs of the ASes interested in ev (sender,
// state_key, room ID, the room's local members and directory aliases),
// applying ev to the room's interest as Submit would, but queuing nothing.
// It is the decision Submit makes per event, exposed for benchmarks and
// diagnostics; it allocates only the result.
func (d *Dispatcher) Interested(ctx context.Context, ev Event) ([]string, error) {
	if d.closed.Load() {
		return nil, ErrClosed
	}
	v := d.view.Load()
	sc, _ := d.scratch.Get().(*scratch)
	if sc == nil {
		sc = new(scratch)
	}
	defer d.scratch.Put(sc)
	keys, err := d.decide(ctx, v, &ev, sc)
	if err != nil || len(keys) == 0 {
		return nil, err
	}
	all := v.set.All()
	out := make([]string, 0, len(keys))
	for _, i := range sc.idx {
		if v.push[i] {
			out = append(out, all[i].ID)
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// targets maps AS indices to the sorted, unique store keys of those allowed.
func (v *view) targets(idx []int32, allowed ...[]bool) []txnstore.ASKey {
	if len(idx) == 0 {
		return nil
	}
	out := make([]txnstore.ASKey, 0, len(idx))
next:
	for _, i := range idx {
		for _, a := range allowed {
			if !a[i] {
				continue next
			}
		}
		out = append(out, v.keys[i])
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// SubmitEphemeral queues ephemeral events for the ASes that asked for them
// (receive_ephemeral): typing and receipts to ASes interested in the room,
// private receipts only to ASes whose users namespace covers the user,
// presence to ASes interested in the user or in one of its rooms.
func (d *Dispatcher) SubmitEphemeral(ctx context.Context, evs ...Ephemeral) (err error) {
	if d.closed.Load() {
		return ErrClosed
	}
	var ats []Position
	for i := range evs {
		if err := checkJSON(evs[i].JSON); err != nil {
			return fmt.Errorf("dispatcher: ephemeral %s: %w", evs[i].Type, err)
		}
		if evs[i].At != (Position{}) {
			if ats == nil {
				ats = make([]Position, len(evs))
			}
			ats[i] = evs[i].At
		}
	}
	ho, err := d.handOver(ctx, ats)
	if err != nil {
		return err
	}
	defer func() { ho.end(err) }()
	v := d.view.Load()
	var sc scratch
	entries := make([]txnstore.Entry, 0, len(evs))
	for i := range evs {
		e := &evs[i]
		if ho.skipped(i) {
			continue
		}
		sc.idx = sc.idx[:0]
		sc.hits = sc.hits[:0]
		for _, u := range e.Users {
			sc.hits = v.set.UsersInterested(sc.hits, u)
		}
		sc.owners()
		if !e.Private {
			rooms := e.Rooms
			if e.RoomID != "" {
				rooms = append([]string{e.RoomID}, rooms...)
			}
			for _, roomID := range rooms {
				sc.hits = v.set.RoomsInterested(sc.hits[:0], roomID)
				sc.owners()
				h, err := v.rooms.acquire(ctx, roomID)
				if err != nil {
					return fmt.Errorf("dispatcher: ephemeral %s: %w", e.Type, err)
				}
				sc.idx = append(sc.idx, h.r.interested...)
				v.rooms.release(&h)
			}
		}
		t := v.targets(sc.idx, v.push, v.eph)
		if en := ho.entry(i, txnstore.Entry{Kind: txnstore.KindEphemeral, Data: e.JSON, Targets: t}); len(t) > 0 || en.Stream != "" {
			entries = append(entries, en)
		}
	}
	return d.append(ctx, entries)
}

// handOver is begin for a call that may have no positions (ats nil).
func (d *Dispatcher) handOver(ctx context.Context, ats []Position) (*handover, error) {
	if ats == nil {
		return nil, nil
	}
	ho, err := d.begin(ctx, ats)
	if err != nil {
		return nil, fmt.Errorf("dispatcher: %w", err)
	}
	return ho, nil
}

// SubmitToDevice queues to-device messages for the ASes that asked for
// ephemeral data and whose users namespace covers the recipient. Messages
// with a position are skipped at or below their stream's, as in Submit.
func (d *Dispatcher) SubmitToDevice(ctx context.Context, msgs ...ToDevice) (err error) {
	if d.closed.Load() {
		return ErrClosed
	}
	var ats []Position
	for i := range msgs {
		if err := checkJSON(msgs[i].JSON); err != nil {
			return fmt.Errorf("dispatcher: to-device %s: %w", msgs[i].Type, err)
		}
		if msgs[i].ToDevice == "*" {
			return fmt.Errorf("dispatcher: to-device %s to %s: %w", msgs[i].Type, msgs[i].ToUser, ErrAllDevices)
		}
		if msgs[i].At != (Position{}) {
			if ats == nil {
				ats = make([]Position, len(msgs))
			}
			ats[i] = msgs[i].At
		}
	}
	ho, err := d.handOver(ctx, ats)
	if err != nil {
		return err
	}
	defer func() { ho.end(err) }()
	v := d.view.Load()
	var sc scratch
	entries := make([]txnstore.Entry, 0, len(msgs))
	for i := range msgs {
		if ho.skipped(i) {
			continue
		}
		sc.userOwners(v.set, msgs[i].ToUser)
		t := v.targets(sc.idx, v.push, v.eph)
		if en := ho.entry(i, txnstore.Entry{Kind: txnstore.KindToDevice, Data: msgs[i].JSON, Targets: t}); len(t) > 0 || en.Stream != "" {
			entries = append(entries, en)
		}
	}
	return d.append(ctx, entries)
}

// InvalidateRoom forgets what the dispatcher knows about a room, for changes
// it does not see as events: call it after every change of the room's
// directory aliases, the only aliases interest looks at. It never waits for
// a Submit in progress; such a call does not put back what it read before.
func (d *Dispatcher) InvalidateRoom(roomID string) {
	d.view.Load().rooms.forget(roomID)
}

// Wake makes the AS's sender retry at once (after a successful ping).
func (d *Dispatcher) Wake(asID string) { d.queues.Wake(asID) }

// Statuses reports every AS the store knows, registered or not.
func (d *Dispatcher) Statuses(ctx context.Context) ([]Status, error) {
	sts, err := d.store.Statuses(ctx)
	if err != nil {
		return nil, fmt.Errorf("dispatcher: statuses: %w", err)
	}
	registered := keySet(d.view.Load().keys)
	out := make([]Status, len(sts))
	for i, st := range sts {
		_, reg := registered[st.Key]
		out[i] = Status{Status: st, Registered: reg}
		if live, ok := d.queues.Live(st.Key); ok {
			out[i].Up, out[i].Failures, out[i].NextRetry = live.Up, live.Failures, live.NextRetry
			out[i].InFlight = live.InFlight
			if !live.LastSuccess.IsZero() {
				out[i].LastSuccess = live.LastSuccess
			}
			if live.LastError != "" {
				out[i].LastError = live.LastError
			}
		}
	}
	return out, nil
}

// Close stops accepting events, lets sends in flight finish (until ctx ends)
// and closes the store. Everything queued stays queued for the next start.
func (d *Dispatcher) Close(ctx context.Context) error {
	if d.closed.Swap(true) {
		return nil
	}
	qerr := d.queues.Close(ctx)
	serr := d.store.Close()
	return errors.Join(qerr, serr)
}
