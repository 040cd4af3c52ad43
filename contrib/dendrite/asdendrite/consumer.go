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
// before the ack replays it.
func (a *API) Start(ctx context.Context, js nats.JetStreamContext, jcfg *config.JetStream) error {
	subj := jcfg.Prefixed(jetstream.OutputAppserviceEvent)
	if err := removeStockConsumers(js, jcfg, a.log); err != nil {
		return err
	}
	info, err := js.StreamInfo(subj)
	if err != nil {
		return fmt.Errorf("stream %s: %w", subj, err)
	}
	a.stream = positionStream(subj, info.Created)
	pos, err := a.d.Position(ctx, a.stream)
	if err != nil {
		return fmt.Errorf("position of %s: %w", a.stream, err)
	}
	a.handed = pos
	a.log.Info("consuming room events", zap.String("stream", a.stream), zap.Int64("handed_over", pos))
	if last := info.State.LastSeq; last < uint64(pos) {
		// Seen once after a SIGKILL ("could not locate msg block"): the
		// stream came back shorter, and new messages will take sequences
		// the dispatcher already holds and skip them. Not repaired yet.
		a.log.Error("JetStream stream came back behind what was handed over: its storage lost messages; new events up to the handed-over sequence will be skipped as replays",
			zap.String("stream", subj), zap.Uint64("last_seq", last), zap.Int64("handed_over", pos))
	}
	if err := a.replayPending(ctx, js, subj, jcfg.Durable(durableName)+"Pull"); err != nil {
		return err
	}
	return jetstream.JetStreamConsumer(ctx, js, subj, jcfg.Durable(durableName), consumerBatch,
		func(ctx context.Context, msgs []*nats.Msg) bool { return a.onMessages(ctx, msgs) },
		nats.DeliverAll(), nats.ManualAck())
}

// replayPending hands over, in stream order, what JetStream delivered to
// our consumer before a crash and never had acknowledged. JetStream
// redelivers those only once their ack wait (30 s) has passed, behind newer
// messages: handed over first, those would move the position past them and
// the dispatcher would skip them as replays. Read from the stream here,
// they go first; their redeliveries are then skipped at their positions.
func (a *API) replayPending(ctx context.Context, js nats.JetStreamContext, subj, consumer string) error {
	ci, err := js.ConsumerInfo(subj, consumer)
	if errors.Is(err, nats.ErrConsumerNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("consumer %s: %w", consumer, err)
	}
	from, to := ci.AckFloor.Stream+1, ci.Delivered.Stream
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
	if a.seen != nil && a.stream != "" {
		var dropped []item
		var err error
		if items, dropped, err = a.seen.dropCopies(ctx, a.stream, a.handed, items); err != nil {
			return err
		}
		for _, it := range dropped {
			a.log.Warn("event published again by Dendrite, copy dropped", zap.String("event_id", it.ev.ID), zap.Uint64("stream_seq", it.seq))
		}
		if err := a.seen.record(ctx, a.stream, a.handed, items); err != nil {
			return err
		}
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
