package asdendrite

import (
	"slices"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/setup/config"
	"github.com/matrix-org/dendrite/setup/jetstream"
	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
)

// startJetStream runs an in-process NATS server with JetStream in a temp dir.
func startJetStream(t *testing.T) nats.JetStreamContext {
	t.Helper()
	srv, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: -1, JetStream: true,
		StoreDir: t.TempDir(), NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats not ready")
	}
	t.Cleanup(srv.Shutdown)
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := nc.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	return js
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
