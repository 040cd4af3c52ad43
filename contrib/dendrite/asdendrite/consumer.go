package asdendrite

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	roomserverAPI "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/dendrite/setup/config"
	"github.com/matrix-org/dendrite/setup/jetstream"
	"github.com/matrix-org/dendrite/syncapi/synctypes"
	"github.com/matrix-org/gomatrixserverlib/spec"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/dispatcher"
)

// consumerBatch is how many messages one fetch takes: they go to the
// dispatcher in one Submit, so one durable commit covers them all.
const consumerBatch = 100

// durableName is our one consumer of OutputAppserviceEvent, in place of
// Dendrite's one per AS ("Appservice_<id>").
const durableName = "AppserviceAsdispatch"

// item is one event to submit with its JetStream stream sequence, which
// becomes its position (dispatcher.Event.At) in positionStream.
type item struct {
	ev  dispatcher.Event
	seq uint64
}

// Start consumes the room events the sync API re-publishes for appservices
// (the stream Dendrite's own appservice consumers read), hands each new event
// to Submit and acknowledges a batch only after Submit returned: a crash
// before the ack replays it. Nothing is published to the stream before
// Start (the sync API starts after the appservice component), so what
// Start finds in it is what JetStream kept from before.
func (a *API) Start(ctx context.Context, js nats.JetStreamContext, jcfg *config.JetStream) error {
	subj := jcfg.Prefixed(jetstream.OutputAppserviceEvent)
	consumer := jcfg.Durable(durableName) + "Pull"
	if err := removeStockConsumers(js, jcfg, a.log); err != nil {
		return err
	}
	info, err := js.StreamInfo(subj)
	if err != nil {
		return fmt.Errorf("stream %s: %w", subj, err)
	}
	last := info.State.LastSeq
	if err := a.openEpoch(ctx, subj, info.Created, last); err != nil {
		return err
	}
	if err := a.replayPending(ctx, js, subj, consumer, last); err != nil {
		return err
	}
	if err := dropConsumerAhead(js, subj, consumer, last, a.log); err != nil {
		return err
	}
	return jetstream.JetStreamConsumer(ctx, js, subj, jcfg.Durable(durableName), consumerBatch,
		func(ctx context.Context, msgs []*nats.Msg) bool { return a.onMessages(ctx, msgs) },
		nats.DeliverAll(), nats.ManualAck())
}

// openEpoch picks the position stream for subj's sequences and loads how
// far it was handed over. Dendrite's in-process JetStream came back from a
// SIGKILL once without the stream's tail ("could not locate msg block"),
// under the same creation time: the sequences it hands out next are ones
// the dispatcher holds under the current name, and every new event would be
// skipped as a replay. So when the stream's last sequence is below the
// stored position, a new epoch of the name begins (kept in the seen store
// before anything is handed over under it), with the last sequence as its
// floor: below it the stream holds only messages handed over before.
func (a *API) openEpoch(ctx context.Context, subj string, created time.Time, last uint64) error {
	base := positionStream(subj, created)
	epoch, floor, err := a.seen.epoch(ctx, base)
	if err != nil {
		return err
	}
	// Should the seen store have been lost, a later epoch shows in the
	// dispatcher's positions. Its floor does not matter then: the epoch's
	// position is above it once anything was handed over under it.
	for {
		p, err := a.d.Position(ctx, epochStream(base, epoch+1))
		if err != nil {
			return fmt.Errorf("position of %s: %w", epochStream(base, epoch+1), err)
		}
		if p == 0 {
			break
		}
		epoch, floor = epoch+1, 0
	}
	name := epochStream(base, epoch)
	pos, err := a.d.Position(ctx, name)
	if err != nil {
		return fmt.Errorf("position of %s: %w", name, err)
	}
	if last < uint64(pos) {
		old := name
		epoch, floor = epoch+1, last
		name = epochStream(base, epoch)
		if err := a.seen.setEpoch(ctx, base, epoch, floor); err != nil {
			return err
		}
		a.log.Error("JetStream stream came back behind what was handed over (its storage lost messages): new position epoch, so the sequences it hands out again are not taken for replays",
			zap.String("jetstream_stream", subj), zap.Uint64("last_seq", last), zap.Int64("handed_over", pos),
			zap.String("old_position_stream", old), zap.String("position_stream", name), zap.Int64("epoch", epoch))
		pos = 0 // the loop above found nothing handed over under name
	}
	a.stream, a.handed, a.floor = name, pos, floor
	a.log.Info("consuming room events", zap.String("position_stream", name), zap.Int64("handed_over", pos),
		zap.Int64("epoch", epoch), zap.Uint64("floor", floor), zap.Uint64("last_seq", last))
	return nil
}

// dropConsumerAhead deletes our consumer if it delivered past the stream's
// last sequence (the stream lost its tail): JetStream would hand it only
// messages above that sequence, and every message published until then
// would never reach us. JetStreamConsumer creates it again, delivering from
// the stream's first message; what was handed over before is skipped at its
// position or below the epoch's floor.
func dropConsumerAhead(js nats.JetStreamContext, subj, consumer string, last uint64, log *zap.Logger) error {
	ci, err := js.ConsumerInfo(subj, consumer)
	if errors.Is(err, nats.ErrConsumerNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("consumer %s: %w", consumer, err)
	}
	if ci.Delivered.Stream <= last {
		return nil
	}
	if err := js.DeleteConsumer(subj, consumer); err != nil && !errors.Is(err, nats.ErrConsumerNotFound) {
		return fmt.Errorf("removing consumer %s ahead of its stream: %w", consumer, err)
	}
	log.Warn("consumer was ahead of its JetStream stream (the stream lost messages): recreated",
		zap.String("consumer", consumer), zap.Uint64("delivered_seq", ci.Delivered.Stream), zap.Uint64("last_seq", last))
	return nil
}

// replayPending hands over, in stream order, what JetStream delivered to
// our consumer before a crash and never had acknowledged. JetStream
// redelivers those only once their ack wait (30 s) has passed, behind newer
// messages: handed over first, those would move the position past them and
// the dispatcher would skip them as replays. Read from the stream here,
// they go first; their redeliveries are then skipped at their positions.
func (a *API) replayPending(ctx context.Context, js nats.JetStreamContext, subj, consumer string, last uint64) error {
	ci, err := js.ConsumerInfo(subj, consumer)
	if errors.Is(err, nats.ErrConsumerNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("consumer %s: %w", consumer, err)
	}
	// Past last the stream lost them (see openEpoch).
	from, to := ci.AckFloor.Stream+1, min(ci.Delivered.Stream, last)
	if from > to {
		return nil
	}
	a.log.Info("handing over what was delivered before a stop and not acknowledged",
		zap.Uint64("from_seq", from), zap.Uint64("to_seq", to))
	var items []item
	var changed []string
	flush := func() error {
		if len(items) > 0 {
			if err := a.submit(ctx, items); err != nil {
				return fmt.Errorf("replaying %s %d-%d: %w", subj, from, to, err)
			}
		}
		for _, room := range changed {
			a.d.InvalidateRoom(room)
		}
		items, changed = items[:0], changed[:0]
		return nil
	}
	for seq := from; seq <= to; seq++ {
		raw, err := js.GetMsg(subj, seq)
		if errors.Is(err, nats.ErrMsgNotFound) {
			continue // acknowledged out of order, or not ours
		}
		if err != nil {
			return fmt.Errorf("replaying %s at %d: %w", subj, seq, err)
		}
		it, room, ok := a.convertData(ctx, raw.Header, raw.Data, seq)
		if room != "" {
			changed = append(changed, room)
		}
		if ok {
			items = append(items, it)
		}
		if len(items) == consumerBatch {
			if err := flush(); err != nil {
				return err
			}
		}
	}
	return flush()
}

// onMessages reports whether the batch may be acknowledged.
func (a *API) onMessages(ctx context.Context, msgs []*nats.Msg) bool {
	items := make([]item, 0, len(msgs))
	var stateChanged []string
	for _, msg := range msgs {
		it, changed, ok := a.convert(ctx, msg)
		if changed != "" {
			stateChanged = append(stateChanged, changed)
		}
		if ok {
			items = append(items, it)
		}
	}
	if len(items) > 0 {
		if err := a.submit(ctx, items); err != nil {
			a.log.Error("submit failed, batch will be redelivered", zap.Int("events", len(items)), zap.Error(err))
			// Nak redelivers at once: pause so a full disk is not hammered.
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
			return false
		}
	}
	// State resolution can change membership without a member event of
	// ours: forget those rooms' interest (after Submit, which held them).
	for _, room := range stateChanged {
		a.d.InvalidateRoom(room)
	}
	return true
}

// positionStream names the dispatcher stream whose positions are the
// JetStream sequences of subj. The stream's creation time is part of the
// name: sequences start again at 1 when Dendrite's JetStream storage is
// wiped or the stream recreated, and under the old name every new event
// would be skipped as already handed over.
func positionStream(subj string, created time.Time) string {
	return fmt.Sprintf("dendrite/%s/%d", subj, created.UnixNano())
}

// epochStream is the name of base's epoch: base itself at first, base@N
// after the Nth time the stream came back behind it (see openEpoch).
func epochStream(base string, epoch int64) string {
	if epoch == 0 {
		return base
	}
	return fmt.Sprintf("%s@%d", base, epoch)
}

// handedIn returns how far the position stream was handed over: a.handed
// for the current one; an earlier one's stored position is final.
func (a *API) handedIn(ctx context.Context, stream string) (int64, error) {
	if stream == a.stream {
		return a.handed, nil
	}
	if p, ok := a.past[stream]; ok {
		return p, nil
	}
	p, err := a.d.Position(ctx, stream)
	if err != nil {
		return 0, fmt.Errorf("position of %s: %w", stream, err)
	}
	if a.past == nil {
		a.past = map[string]int64{}
	}
	a.past[stream] = p
	return p, nil
}

// submit hands the items to the dispatcher in one call, each at its
// JetStream sequence: a batch redelivered after a crash between Submit and
// the ack is skipped by the dispatcher instead of delivered twice.
func (a *API) submit(ctx context.Context, items []item) error {
	// A fetch may mix redelivered messages with new ones; positions must
	// not go down within a call. A sequence twice in one fetch is one
	// message delivered twice: the dispatcher skips only positions at or
	// below the stored one, so within a call it is dropped here.
	slices.SortStableFunc(items, func(x, y item) int { return cmp.Compare(x.seq, y.seq) })
	items = slices.CompactFunc(items, func(x, y item) bool { return x.seq > 0 && x.seq == y.seq })
	if a.floor > 0 {
		// Messages the stream kept from before its epoch began, handed over
		// then under an earlier name.
		n := len(items)
		items = slices.DeleteFunc(items, func(it item) bool { return it.seq > 0 && it.seq <= a.floor })
		if n > len(items) {
			a.log.Info("messages handed over before the position epoch began, skipped",
				zap.Int("events", n-len(items)), zap.Uint64("floor", a.floor))
		}
	}
	if a.seen != nil && a.stream != "" {
		var dropped []item
		var err error
		if items, dropped, err = a.seen.dropCopies(ctx, a.stream, a.handedIn, items); err != nil {
			return err
		}
		for _, it := range dropped {
			a.log.Warn("event published again by Dendrite, copy dropped", zap.String("event_id", it.ev.ID), zap.Uint64("stream_seq", it.seq))
		}
		if err := a.seen.record(ctx, a.stream, a.handed, items); err != nil {
			return err
		}
	}
	if len(items) == 0 {
		return nil
	}
	if err := a.handOver(ctx, items); err != nil {
		return err
	}
	for _, it := range items {
		a.handed = max(a.handed, int64(it.seq))
	}
	return nil
}

// handOver submits the items, each at its position.
func (a *API) handOver(ctx context.Context, items []item) error {
	evs := make([]dispatcher.Event, len(items))
	for i := range items {
		if a.stream != "" && items[i].seq > 0 {
			items[i].ev.At = dispatcher.Position{Stream: a.stream, Pos: int64(items[i].seq)}
		}
		evs[i] = items[i].ev
	}
	err := a.d.Submit(ctx, evs...)
	if errors.Is(err, dispatcher.ErrInvalidID) || errors.Is(err, dispatcher.ErrInvalidJSON) {
		// A call is all or nothing: submit one by one so one event that can
		// never be queued does not block the stream forever.
		for _, it := range items {
			if err := a.d.Submit(ctx, it.ev); err != nil {
				if errors.Is(err, dispatcher.ErrInvalidID) || errors.Is(err, dispatcher.ErrInvalidJSON) {
					a.log.Error("event dropped: the dispatcher refuses it", zap.String("event_id", it.ev.ID),
						zap.Uint64("stream_seq", it.seq), zap.Error(err))
					continue
				}
				return err
			}
		}
		return nil
	}
	return err
}

// convert turns one output message into an event for the dispatcher. ok is
// false for a message that carries none (skipped, acknowledged); stateRoom
// names the room if the event's state delta touched more than the event.
func (a *API) convert(ctx context.Context, msg *nats.Msg) (it item, stateRoom string, ok bool) {
	var seq uint64
	if md, err := msg.Metadata(); err == nil {
		seq = md.Sequence.Stream
	}
	return a.convertData(ctx, msg.Header, msg.Data, seq)
}

// convertData is convert of a message's header and data at stream sequence seq.
func (a *API) convertData(ctx context.Context, h nats.Header, data []byte, seq uint64) (it item, stateRoom string, ok bool) {
	if roomserverAPI.OutputType(h.Get(jetstream.RoomEventType)) != roomserverAPI.OutputTypeNewRoomEvent {
		return it, "", false
	}
	var out roomserverAPI.OutputEvent
	if err := json.Unmarshal(data, &out); err != nil || out.NewRoomEvent == nil || out.NewRoomEvent.Event == nil {
		a.log.Error("unparsable roomserver output event, skipped", zap.Error(err))
		return it, "", false
	}
	it.seq = seq
	nre := out.NewRoomEvent
	pdu := nre.Event.PDU
	ce, err := synctypes.ToClientEvent(pdu, synctypes.FormatAll, func(roomID spec.RoomID, senderID spec.SenderID) (*spec.UserID, error) {
		return a.rsAPI.QueryUserIDForSender(ctx, roomID, senderID)
	})
	if err != nil {
		a.log.Error("event not convertible to client format, skipped", zap.String("event_id", pdu.EventID()), zap.Error(err))
		return it, "", false
	}
	js, err := json.Marshal(ce)
	if err != nil {
		a.log.Error("event not serializable, skipped", zap.String("event_id", pdu.EventID()), zap.Error(err))
		return it, "", false
	}
	it.ev = dispatcher.Event{ID: ce.EventID, RoomID: ce.RoomID, Type: ce.Type, Sender: ce.Sender,
		StateKey: ce.StateKey, JSON: js}
	if ce.Type == spec.MRoomMember {
		var c struct {
			Membership string `json:"membership"`
		}
		if err := json.Unmarshal(ce.Content, &c); err == nil {
			it.ev.Membership = c.Membership
		}
	}
	if len(nre.RemovesStateEventIDs) > 0 || len(nre.AddsStateEventIDs) > 1 ||
		(len(nre.AddsStateEventIDs) == 1 && nre.AddsStateEventIDs[0] != ce.EventID) {
		stateRoom = ce.RoomID
	}
	return it, stateRoom, true
}

// removeStockConsumers deletes the per-AS consumers stock Dendrite left on
// the stream ("Appservice_<id>Pull"): the stream keeps every message until
// each consumer has it, so after switching from stock Dendrite they would
// hold every event on disk forever.
func removeStockConsumers(js nats.JetStreamContext, jcfg *config.JetStream, log *zap.Logger) error {
	stream := jcfg.Prefixed(jetstream.OutputAppserviceEvent)
	prefix := jcfg.Durable("Appservice_")
	var stale []string
	for name := range js.ConsumerNames(stream) {
		if strings.HasPrefix(name, prefix) {
			stale = append(stale, name)
		}
	}
	for _, name := range stale {
		if err := js.DeleteConsumer(stream, name); err != nil && !errors.Is(err, nats.ErrConsumerNotFound) {
			return fmt.Errorf("removing stock Dendrite's consumer %s: %w", name, err)
		}
		log.Info("removed stock Dendrite's appservice consumer", zap.String("consumer", name))
	}
	return nil
}
