package asdendrite

import (
	"bytes"
	"context"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/matrix-org/dendrite/setup/config"
	"github.com/matrix-org/dendrite/setup/jetstream"
	natsserver "github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/asdispatch/asdispatch/dispatcher"
	"github.com/asdispatch/asdispatch/registry"
)

// natsNode is a JetStream server on one store directory, restartable.
type natsNode struct {
	dir string
	srv *natsserver.Server
	nc  *nats.Conn
	js  nats.JetStreamContext
}

func (n *natsNode) start(t *testing.T) {
	t.Helper()
	srv, err := natsserver.NewServer(&natsserver.Options{Host: "127.0.0.1", Port: -1, JetStream: true,
		StoreDir: n.dir, SyncAlways: true, NoSigs: true, NoLog: true})
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats not ready")
	}
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	js, err := nc.JetStream()
	if err != nil {
		t.Fatal(err)
	}
	n.srv, n.nc, n.js = srv, nc, js
}

func (n *natsNode) stop() {
	n.nc.Close()
	n.srv.Shutdown()
	n.srv.WaitForShutdown()
}

// msgsDir is where the server keeps the stream's messages.
func (n *natsNode) msgsDir(t *testing.T, stream string) string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(n.dir, "jetstream", "*", "streams", stream, "msgs"))
	if err != nil || len(m) != 1 {
		t.Fatalf("msgs dir of %s: %v %v", stream, m, err)
	}
	return m[0]
}

// addStream creates the stream as Dendrite does, and a consumer that never
// acknowledges (as another component's would), so the stream keeps what
// we acknowledged and a lost tail can leave messages before it.
func addStream(t *testing.T, js nats.JetStreamContext, stream string) {
	t.Helper()
	if _, err := js.AddStream(&nats.StreamConfig{Name: stream, Retention: nats.InterestPolicy,
		Storage: nats.FileStorage, Subjects: []string{stream}}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.AddConsumer(stream, &nats.ConsumerConfig{Durable: "HolderPull", AckPolicy: nats.AckExplicitPolicy}); err != nil {
		t.Fatal(err)
	}
}

// consumerRunning reports whether a JetStreamConsumer goroutine is alive.
func consumerRunning() bool {
	buf := make([]byte, 1<<20)
	return bytes.Contains(buf[:runtime.Stack(buf, true)], []byte("jetstream.JetStreamConsumer.func"))
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.CopyFS(to, os.DirFS(from)); err != nil {
		t.Fatal(err)
	}
}

// A stream that comes back from a kill behind what was handed over (its
// tail lost, as Dendrite's in-process JetStream did once after a SIGKILL:
// "could not locate msg block"), or recreated, hands out sequences again
// that the dispatcher holds: every new event still reaches the AS once,
// after the old ones, and a copy of an old event published after it (the
// sync API publishing again) is dropped. A later restart keeps the epoch.
func TestStreamComesBackBehind(t *testing.T) {
	for _, tc := range []struct {
		name     string
		kept     int  // the tail is lost after the first kept of 5 events
		recreate bool // the stream is deleted and created again instead
		epoch    string
	}{
		{name: "tail lost, nothing kept", kept: 0, epoch: "@1"},
		{name: "tail lost, 3 kept", kept: 3, epoch: "@1"},
		{name: "stream recreated", recreate: true},
	} {
		t.Run(tc.name, func(t *testing.T) { testStreamComesBackBehind(t, tc.kept, tc.recreate, tc.epoch) })
	}
}

func testStreamComesBackBehind(t *testing.T, kept int, recreate bool, wantEpoch string) {
	jcfg := &config.JetStream{TopicPrefix: "Dendrite"}
	stream := jcfg.Prefixed(jetstream.OutputAppserviceEvent)
	set, as := startRecordAS(t, false)
	dataDir := t.TempDir()
	node := &natsNode{dir: t.TempDir()}
	core, logs := observer.New(zap.InfoLevel)

	// run is one life of the server: our component started on the node,
	// the bodies published, until the AS has want; then stopped.
	run := func(publish []string, want string) string {
		t.Helper()
		ctx, cancel := context.WithCancel(context.Background())
		d, err := dispatcher.New(ctx, dispatcher.Config{Registry: registry.NewRegistry(set), DataDir: dataDir})
		if err != nil {
			t.Fatal(err)
		}
		seen, err := openSeen(ctx, filepath.Join(dataDir, "dendrite-seen.db"))
		if err != nil {
			t.Fatal(err)
		}
		a := &API{d: d, log: zap.New(core), rsAPI: senderRS{}, seen: seen}
		if err := a.Start(ctx, node.js, jcfg); err != nil {
			t.Fatal(err)
		}
		// The consumer stopped before the server, also when the test
		// fails: it exits the process on errors other than its context's.
		defer func() {
			cancel()
			for consumerRunning() {
				time.Sleep(10 * time.Millisecond)
			}
			if err := a.Close(context.Background()); err != nil {
				t.Error(err)
			}
			node.stop()
		}()
		for _, body := range publish {
			publishMessage(t, node.js, stream, body, int64(crc32.ChecksumIEEE([]byte(body))))
		}
		deadline := time.Now().Add(15 * time.Second)
		for {
			s := as.String()
			if s == want {
				break
			}
			if time.Now().After(deadline) || len(s) > len(want) {
				for _, e := range logs.All() {
					t.Logf("log: %s %s %v", e.Level, e.Message, e.ContextMap())
				}
				t.Fatalf("the AS got %q, want %s", s, want)
			}
			time.Sleep(10 * time.Millisecond)
		}
		// Everything acknowledged before the stop.
		for {
			ci, err := node.js.ConsumerInfo(stream, jcfg.Durable(durableName)+"Pull")
			if err != nil {
				t.Fatal(err)
			}
			if ci.NumAckPending == 0 {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		return a.stream
	}

	node.start(t)
	addStream(t, node.js, stream)
	var first []string
	for i := 1; i <= kept; i++ {
		first = append(first, fmt.Sprintf("e%d", i))
	}
	run(first, strings.Join(first, ","))
	snapshot := filepath.Join(t.TempDir(), "msgs")
	copyDir(t, node.msgsDir(t, stream), snapshot)

	node.start(t)
	old := run([]string{"e1", "e2", "e3", "e4", "e5"}[kept:], "e1,e2,e3,e4,e5")

	node.start(t)
	if recreate {
		if err := node.js.DeleteStream(stream); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond) // a new creation time
		addStream(t, node.js, stream)
	} else {
		// The stream's messages back to before e{kept+1}; its creation
		// time and the consumers' states (delivered up to 5) are kept.
		node.stop()
		dir := node.msgsDir(t, stream)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		copyDir(t, snapshot, dir)
		node.start(t)
		if si, err := node.js.StreamInfo(stream); err != nil || si.State.LastSeq != uint64(kept) {
			t.Fatalf("stream after the loss: %+v, %v; want last sequence %d", si, err, kept)
		}
	}
	// e5 published again: a copy of what was handed over before.
	now := run([]string{"n1", "n2", "e5", "n3"}, "e1,e2,e3,e4,e5,n1,n2,n3")
	base := strings.TrimSuffix(old, wantEpoch)
	if recreate {
		if now == old || strings.Contains(now, "@") {
			t.Errorf("position stream %s after the stream was recreated (was %s)", now, old)
		}
	} else if now != old+wantEpoch {
		t.Errorf("position stream %s, want %s%s", now, base, wantEpoch)
	}
	resets := logs.FilterMessageSnippet("came back behind").All()
	if wantReset := !recreate; (len(resets) == 1) != wantReset || len(resets) > 1 {
		t.Errorf("%d reset logs, want %v", len(resets), wantReset)
	}
	for _, e := range resets {
		f := e.ContextMap()
		if e.Level != zap.ErrorLevel || f["epoch"] != int64(1) || f["handed_over"] != int64(5) || f["last_seq"] != uint64(kept) {
			t.Errorf("reset logged as %v %q %v", e.Level, e.Message, f)
		}
	}

	// What the stream kept from before is skipped below the floor (the
	// seen store would drop it too, while it remembers those IDs).
	skipped := int64(0)
	for _, e := range logs.FilterMessageSnippet("before the position epoch began").All() {
		skipped += e.ContextMap()["events"].(int64)
	}
	if skipped != int64(kept) {
		t.Errorf("%d messages skipped below the floor, want %d", skipped, kept)
	}

	// Restarted as is: the same epoch, nothing lost or repeated.
	node.start(t)
	if again := run([]string{"n4"}, "e1,e2,e3,e4,e5,n1,n2,n3,n4"); again != now {
		t.Errorf("position stream %s after a plain restart, want %s", again, now)
	}
	as.settle(t, "e1,e2,e3,e4,e5,n1,n2,n3,n4") // a duplicate would arrive by now
}
