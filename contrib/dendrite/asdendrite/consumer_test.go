package asdendrite

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	roomserverAPI "github.com/matrix-org/dendrite/roomserver/api"
	"github.com/matrix-org/dendrite/setup/config"
	"github.com/matrix-org/dendrite/setup/jetstream"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

// startJetStream runs an in-process NATS server with JetStream in a temp dir.
func startJetStream(t *testing.T) nats.JetStreamContext {
	t.Helper()
	n := &natsNode{dir: t.TempDir()}
	n.start(t)
	t.Cleanup(n.stop)
	return n.js
}

// publishMessage publishes a new room event of @irc_bob with body to
// stream, as the sync API does. The event ID hashes the redacted event:
// ts, not the body, makes it one of its own.
func publishMessage(t *testing.T, js nats.JetStreamContext, stream, body string, ts int64) {
	t.Helper()
	ev := pdu(t, fmt.Sprintf(`{"type":"m.room.message","content":{"body":%q},"room_id":"!r:example.org","sender":"@irc_bob:example.org","origin_server_ts":%d,"depth":3,"prev_events":[],"auth_events":[],"hashes":{"sha256":"x"},"signatures":{}}`, body, ts))
	msg := outputMsg(t, roomserverAPI.OutputTypeNewRoomEvent, ev, nil, nil)
	msg.Subject = stream
	if _, err := js.PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
}

// Consumers stock Dendrite left on the stream are removed (they would pin
// every message on disk); ours and other components' are kept.
func TestRemoveStockConsumers(t *testing.T) {
	js := startJetStream(t)
	jcfg := &config.JetStream{TopicPrefix: "Dendrite"}
	stream := jcfg.Prefixed(jetstream.OutputAppserviceEvent)
	if _, err := js.AddStream(&nats.StreamConfig{Name: stream, Retention: nats.InterestPolicy, Subjects: []string{stream}}); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"Appservice_ircPull", "Appservice_telegramPull", durableName + "Pull", "SyncAPIPull"} {
		if _, err := js.AddConsumer(stream, &nats.ConsumerConfig{Durable: jcfg.Durable(name), AckPolicy: nats.AckExplicitPolicy}); err != nil {
			t.Fatal(err)
		}
	}
	if err := removeStockConsumers(js, jcfg, zap.NewNop()); err != nil {
		t.Fatal(err)
	}
	var left []string
	for n := range js.ConsumerNames(stream) {
		left = append(left, n)
	}
	slices.Sort(left)
	want := []string{jcfg.Durable(durableName + "Pull"), jcfg.Durable("SyncAPIPull")}
	if !slices.Equal(left, want) {
		t.Errorf("consumers left %v, want %v", left, want)
	}
}

// Messages JetStream delivered before a crash and never had acknowledged
// are handed over at start-up, before anything newer: JetStream would
// redeliver them only after their ack wait, behind newer messages whose
// positions would make the dispatcher skip them.
func TestReplayPending(t *testing.T) {
	js := startJetStream(t)
	const stream = "DendriteOutputAppserviceEvent"
	if _, err := js.AddStream(&nats.StreamConfig{Name: stream, Retention: nats.InterestPolicy, Subjects: []string{stream}}); err != nil {
		t.Fatal(err)
	}
	const consumer = "AppserviceAsdispatchPull"
	sub, err := js.PullSubscribe(stream, consumer, nats.DeliverAll(), nats.ManualAck())
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 4; i++ {
		publishMessage(t, js, stream, fmt.Sprintf("m%d", i), int64(i))
	}
	set, as := startRecordAS(t, false)
	ctx := context.Background()
	d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close(ctx)
	pos := positionStream(stream, time.Unix(1700000000, 0))
	a := &API{d: d, log: zap.NewNop(), rsAPI: senderRS{}, stream: pos}
	// Before the crash: 1 to 3 fetched, 1 handed over and acknowledged,
	// 2 and 3 not yet handed over; 4 not fetched.
	msgs, err := sub.Fetch(3, nats.MaxWait(5*time.Second))
	if err != nil || len(msgs) != 3 {
		t.Fatalf("fetch: %d messages, %v", len(msgs), err)
	}
	if !a.onMessages(ctx, msgs[:1]) {
		t.Fatal("onMessages refused the first message")
	}
	if err := msgs[0].AckSync(); err != nil {
		t.Fatal(err)
	}
	if err := a.replayPending(ctx, js, stream, consumer, 4); err != nil {
		t.Fatal(err)
	}
	if p, err := d.Position(ctx, pos); err != nil || p != 3 {
		t.Fatalf("Position = %d, %v; want 3", p, err)
	}
	want := "m1,m2,m3"
	as.wait(t, want)
}
