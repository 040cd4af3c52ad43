//go:build !race

// mautrix-go v0.32.0's websocket client, run in this process here, writes
// AppService.ws when a connection ends (appservice/websocket.go) while the
// goroutines answering that connection's transactions still read it,
// without synchronization: -race reports mautrix-go's race, not ours. These
// tests run without -race (.ci/run runs them so); the server side's own
// races are covered by asws's unit tests under -race, and the real bridge
// in websocket mode (a separate process) by TestMautrixBridgev2Websocket.

package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/appservice"
	"maunium.net/go/mautrix/event"
)

// wsRegistration is the bridge's registration: no URL, so the homeserver
// can reach it only over the socket the bridge opens.
const wsRegistration = `id: mx
url: null
as_token: as-mx
hs_token: hs-mx
sender_localpart: mxbot
namespaces:
  users: [{exclusive: true, regex: "@mx_.*"}]
  aliases: [{exclusive: true, regex: "#mx_.*"}]
`

// wsServe writes the registration and a config listening on listen, and
// returns the config's path.
func wsServe(t *testing.T, dir, listen, extra string) string {
	t.Helper()
	reg := filepath.Join(dir, "mx-registration.yaml")
	if err := os.WriteFile(reg, []byte(wsRegistration), 0o600); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "homeserver.yaml")
	body := fmt.Sprintf("server_name: localhost\nlisten: %s\ndata_dir: %s\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 50ms\n  retry_max: 300ms\n%s",
		listen, filepath.Join(dir, "data"), reg, extra)
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return config
}

// wsLoop runs mautrix-go's websocket as bridges do: StartWebsocket again
// after each disconnect, with a short backoff, until ctx ends or another
// connection replaces it (bridgev2 exits then). Each StartWebsocket's
// error is sent on the returned channel, which closes when the loop ends.
func wsLoop(ctx context.Context, mas *appservice.AppService) <-chan error {
	out := make(chan error, 64)
	go func() {
		defer close(out)
		for ctx.Err() == nil {
			err := mas.StartWebsocket(ctx, "", nil)
			select {
			case out <- err:
			default:
			}
			var cc *appservice.CloseCommand
			if errors.As(err, &cc) && cc.Status == appservice.MeowConnectionReplaced {
				return
			}
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	}()
	return out
}

// adminRow returns the admin status row of the AS mx.
func adminRow(t *testing.T, admin string) map[string]any {
	t.Helper()
	out := call(t, "GET", admin+"/_asdispatch/v1/appservices", "", nil)
	rows, _ := out["appservices"].([]any)
	for _, r := range rows {
		if m, _ := r.(map[string]any); m["id"] == "mx" {
			return m
		}
	}
	t.Fatalf("no status row for mx in %v", out)
	return nil
}

func waitUntil(t *testing.T, what string, timeout time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestMautrixWebsocket: an unmodified mautrix-go appservice in websocket
// mode, with no URL in its registration, against `asdispatch serve`: what
// was sent before it connected arrives in order once it does, then live
// events; user and alias queries over the socket create lazily; ping both
// ways; bridge_status and the transport in the admin status.
func TestMautrixWebsocket(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	hs, admin, _ := startServeAdmin(t, bin, wsServe(t, dir, "127.0.0.1:0", ""))
	mas := newMautrix(t, "hs-mx")
	if err := mas.SetHomeserverURL(hs); err != nil {
		t.Fatal(err)
	}
	mas.BotIntent()
	ctx := context.Background()

	// Before the bridge connects: its ghost talks over the client API.
	ghost := mas.Intent("@mx_ghost:localhost")
	if err := ghost.EnsureRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	room, err := ghost.CreateRoom(ctx, &mautrix.ReqCreateRoom{RoomAliasName: "mx_chan", Preset: "public_chat"})
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	send := func(body string) {
		t.Helper()
		if _, err := ghost.SendText(ctx, room.RoomID, body); err != nil {
			t.Fatal(err)
		}
		want = append(want, body)
	}
	for i := range 3 {
		send(fmt.Sprintf("before %d", i))
	}
	if row := adminRow(t, admin); row["transport"] != "none" || row["backlog_events"].(float64) == 0 {
		t.Fatalf("before the socket: %v", row)
	}

	var mu sync.Mutex
	var got []string
	go func() {
		for evt := range mas.Events {
			if evt.Type == event.EventMessage {
				_ = evt.Content.ParseRaw(evt.Type)
				mu.Lock()
				got = append(got, evt.Content.AsMessage().Body)
				mu.Unlock()
			}
		}
	}()
	wsCtx, stop := context.WithCancel(ctx)
	loop := wsLoop(wsCtx, mas)
	t.Cleanup(func() {
		stop()
		for range loop {
		}
	})
	waitGot := func() {
		t.Helper()
		waitUntil(t, "the bridge to receive "+strings.Join(want, ", "), 20*time.Second, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return len(got) >= len(want)
		})
		mu.Lock()
		defer mu.Unlock()
		if !slices.Equal(got, want) {
			t.Fatalf("bridge received %q, want %q", got, want)
		}
	}
	waitGot()
	for i := range 3 {
		send(fmt.Sprintf("after %d", i))
	}
	waitGot()

	// Queries over the socket: the bridge's QueryHandler creates the alias
	// and the user as it is asked.
	alice, err := mautrix.NewClient(hs, "", "")
	if err != nil {
		t.Fatal(err)
	}
	reg, _, err := alice.Register(ctx, &mautrix.ReqRegister[any]{Username: "alice", Password: "pw"})
	if err != nil {
		t.Fatal(err)
	}
	alice.SetCredentials(reg.UserID, reg.AccessToken)
	q := mas.QueryHandler.(*bridgeQueries)
	if _, err := alice.JoinRoom(ctx, "#mx_lazy:localhost", nil); err != nil {
		t.Fatalf("join of a lazily created alias: %v", err)
	}
	own, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := alice.InviteUser(ctx, own.RoomID, &mautrix.ReqInviteUser{UserID: "@mx_new:localhost"}); err != nil {
		t.Fatalf("invite of a lazily created user: %v", err)
	}
	if q.aliases.Load() == 0 || q.users.Load() == 0 {
		t.Fatalf("queries over the socket: %d alias, %d user", q.aliases.Load(), q.users.Load())
	}

	// Ping, homeserver to bridge (the client ping goes over the socket)
	// and bridge to homeserver (the socket's own ping).
	if resp, err := mas.BotClient().AppservicePing(ctx, "mx", "ping-txn"); err != nil || resp.DurationMS < 0 {
		t.Fatalf("appservice ping: %v %v", resp, err)
	}
	start := time.Now().UnixMilli()
	var pong struct {
		Timestamp int64 `json:"timestamp"`
	}
	pctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := mas.RequestWebsocket(pctx, &appservice.WebsocketRequest{Command: "ping", Data: map[string]int64{"timestamp": start}}, &pong); err != nil || pong.Timestamp < start {
		t.Fatalf("websocket ping: %+v %v", pong, err)
	}

	// bridge_status shows in the admin status, beside the transport.
	if err := mas.SendWebsocket(ctx, &appservice.WebsocketRequest{Command: "bridge_status", Data: map[string]any{"state_event": "CONNECTED"}}); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the bridge status in the admin status", 10*time.Second, func() bool {
		ws, _ := adminRow(t, admin)["websocket"].(map[string]any)
		bs, _ := ws["bridge_status"].(map[string]any)
		return bs["state_event"] == "CONNECTED"
	})
	waitUntil(t, "the backlog to drain", 10*time.Second, func() bool {
		return adminRow(t, admin)["backlog_events"].(float64) == 0
	})
	row := adminRow(t, admin)
	ws, _ := row["websocket"].(map[string]any)
	if row["transport"] != "websocket" || ws["connected"] != true || ws["connection_age_ms"] == nil {
		t.Fatalf("admin status: %v", row)
	}
	resp, err := http.Get(admin + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	metrics, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, m := range []string{`asdispatch_websocket_acks_total{appservice="mx"}`, `asdispatch_websocket_frames_total{appservice="mx",direction="in"}`, `asdispatch_websocket_connections_total{appservice="mx"} 1`} {
		if !strings.Contains(string(metrics), m) {
			t.Errorf("metrics lack %s", m)
		}
	}
}

// txnLog is what the bridges received, through mautrix-go's
// WebsocketTransactionHandler hook (the transport is mautrix's own).
type txnLog struct {
	mu       sync.Mutex
	bodies   map[string]string // txn id → the body first received
	order    []string          // txn ids, first receipt
	msgs     []string          // message bodies, first receipt of their txn
	conflict []string
	// hook, if set, runs after a transaction carrying messages was
	// recorded, before it is acknowledged; it is cleared first.
	hook func()
}

func (l *txnLog) handler(ctx context.Context, msg appservice.WebsocketMessage) (bool, any) {
	body, _ := json.Marshal(msg.Transaction)
	l.mu.Lock()
	var hook func()
	if prev, ok := l.bodies[msg.TxnID]; ok {
		if prev != string(body) {
			l.conflict = append(l.conflict, fmt.Sprintf("txn %s: %s then %s", msg.TxnID, prev, body))
		}
	} else {
		l.bodies[msg.TxnID] = string(body)
		l.order = append(l.order, msg.TxnID)
		n := len(l.msgs)
		for _, evt := range msg.Events {
			if evt.Type == event.EventMessage {
				b, _ := evt.Content.Raw["body"].(string)
				l.msgs = append(l.msgs, b)
			}
		}
		if len(l.msgs) > n {
			hook, l.hook = l.hook, nil
		}
	}
	l.mu.Unlock()
	if hook != nil {
		hook()
	}
	return true, &appservice.WebsocketTransactionResponse{TxnID: msg.TxnID}
}

func (l *txnLog) setHook(f func()) {
	l.mu.Lock()
	l.hook = f
	l.mu.Unlock()
}

// TestMautrixWebsocketFaults: mautrix-go bridges in websocket mode that drop
// the connection mid-transaction, never acknowledge, are replaced twice,
// and a serve SIGKILLed and restarted: every event arrives, once per txn
// id and in order, and a txn id never comes with two bodies.
func TestMautrixWebsocketFaults(t *testing.T) {
	bin := buildBinary(t)
	dir := t.TempDir()
	listen := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	config := wsServe(t, dir, listen, "  txn_timeout: 1s\n  max_events_per_txn: 2\n")
	hs, admin, cmd := startServeAdmin(t, bin, config)
	ctx := context.Background()
	log := &txnLog{bodies: map[string]string{}}
	bridge := func() *appservice.AppService {
		mas := newMautrix(t, "hs-mx")
		if err := mas.SetHomeserverURL(hs); err != nil {
			t.Fatal(err)
		}
		mas.BotIntent()
		mas.WebsocketTransactionHandler = log.handler
		return mas
	}
	wsCtx, stop := context.WithCancel(ctx)
	var loops []<-chan error
	t.Cleanup(func() {
		stop()
		for _, l := range loops {
			for range l {
			}
		}
	})
	a := bridge()
	loopA := wsLoop(wsCtx, a)
	loops = append(loops, loopA)

	ghost := a.Intent("@mx_ghost:localhost")
	if err := ghost.EnsureRegistered(ctx); err != nil {
		t.Fatal(err)
	}
	room, err := ghost.CreateRoom(ctx, &mautrix.ReqCreateRoom{Preset: "public_chat"})
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	send := func(phase string, n int) {
		t.Helper()
		for i := range n {
			body := fmt.Sprintf("%s %d", phase, i)
			if _, err := ghost.SendText(ctx, room.RoomID, body); err != nil {
				t.Fatal(err)
			}
			want = append(want, body)
		}
	}
	delivered := func() {
		t.Helper()
		waitUntil(t, "delivery of "+strings.Join(want, ", "), 30*time.Second, func() bool {
			log.mu.Lock()
			defer log.mu.Unlock()
			return len(log.msgs) >= len(want)
		})
	}
	send("warmup", 3)
	delivered()

	// 1. The bridge handles a transaction and drops the socket before its
	// ack goes out: the same txn id and body come again on the next socket.
	dropped := make(chan struct{})
	log.setHook(func() {
		a.StopWebsocket(errors.New("test: drop mid-transaction"))
		close(dropped)
		time.Sleep(300 * time.Millisecond) // the socket closes before the ack is written
	})
	send("drop", 3)
	<-dropped
	delivered()

	// 2. The bridge takes a transaction and never answers: after three
	// attempts without an ack the server closes with 4002, and the bridge's
	// next socket gets it again.
	release := make(chan struct{})
	stuck := make(chan struct{})
	log.setHook(func() {
		close(stuck)
		<-release
	})
	send("hang", 3)
	<-stuck
	waitUntil(t, "the server to give up on the silent socket", 30*time.Second, func() bool {
		ws, _ := adminRow(t, admin)["websocket"].(map[string]any)
		return ws["connected"] == false
	})
	close(release)
	var codes []string
	waitUntil(t, "the bridge to see close 4002", 20*time.Second, func() bool {
		select {
		case err := <-loopA:
			var cc *appservice.CloseCommand
			if errors.As(err, &cc) {
				codes = append(codes, strconv.Itoa(int(cc.Code)))
			}
		default:
		}
		return slices.Contains(codes, "4002")
	})
	delivered()

	// 3. Two more instances of the bridge connect: each replaces the one
	// before, which is closed with 4001 conn_replaced and stops.
	for i, name := range []string{"b", "c"} {
		next := bridge()
		loops = append(loops, wsLoop(wsCtx, next))
		prev := loops[len(loops)-2]
		replaced := false
		for err := range prev { // the loop ends when its bridge is replaced
			var cc *appservice.CloseCommand
			replaced = errors.As(err, &cc) && cc.Status == appservice.MeowConnectionReplaced && cc.Code == 4001
		}
		if !replaced {
			t.Fatalf("replacement %d: the old bridge stopped without 4001 conn_replaced", i)
		}
		send("replaced-"+name, 3)
		delivered()
	}

	// 4. serve is SIGKILLed right after events were committed, and
	// restarted on the same port and data: the bridge reconnects and gets
	// what was not acknowledged, with the same txn ids and bodies.
	send("crash", 4)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_, _ = cmd.Process.Wait()
	hs2, _, _ := startServeAdmin(t, bin, config)
	if hs2 != hs {
		t.Fatalf("serve came back on %s, not %s", hs2, hs)
	}
	send("restarted", 3)
	delivered()

	log.mu.Lock()
	defer log.mu.Unlock()
	if len(log.conflict) > 0 {
		t.Fatalf("a txn id came with two bodies: %v", log.conflict)
	}
	if !slices.Equal(log.msgs, want) {
		t.Fatalf("events in order of first receipt:\n%q\nwant\n%q", log.msgs, want)
	}
	last := int64(0)
	for _, id := range log.order {
		n, err := strconv.ParseInt(id, 10, 64)
		if err != nil || n <= last {
			t.Fatalf("txn ids not increasing: %v", log.order)
		}
		last = n
	}
	if !slices.Contains(codes, "4002") {
		t.Fatalf("no 4002 close seen: %v", codes)
	}
}
