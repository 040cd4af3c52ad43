package integration

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// recorder is a reverse proxy on 127.0.0.1 between real Matrix software and
// `asdispatch serve`. It logs every request as method and path template and
// fails the test on any 404, 405 or 5xx answer: a bridge that swallows an
// error (or retries it away) must not hide an endpoint the stub lacks.
type recorder struct {
	t      *testing.T
	URL    string // what the software under test is given as its homeserver
	proxy  *httputil.ReverseProxy
	mu     sync.Mutex
	target *url.URL
	counts map[string]int    // "METHOD template status" -> count
	bad    map[string]string // the same keys, bad answers only -> the first one's detail
}

// newRecorder starts the proxy. Its target is set with setTarget once serve
// listens, so that configs naming the homeserver can be written first.
func newRecorder(t *testing.T) *recorder {
	t.Helper()
	rec := &recorder{t: t, counts: map[string]int{}, bad: map[string]string{}}
	rec.proxy = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			rec.mu.Lock()
			target := rec.target
			rec.mu.Unlock()
			pr.SetURL(target)
		},
		ModifyResponse: rec.observe,
		ErrorHandler:   rec.proxyError,
		FlushInterval:  -1,
	}
	srv := httptest.NewServer(rec.proxy)
	t.Cleanup(func() {
		srv.Close()
		rec.report()
	})
	rec.URL = srv.URL
	return rec
}

func (rec *recorder) setTarget(base string) {
	u, err := url.Parse(base)
	if err != nil {
		rec.t.Fatal(err)
	}
	rec.mu.Lock()
	rec.target = u
	rec.mu.Unlock()
}

func (rec *recorder) observe(resp *http.Response) error {
	req := resp.Request
	key := fmt.Sprintf("%s %s %d", req.Method, pathTemplate(req.URL.EscapedPath()), resp.StatusCode)
	bad := resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusMethodNotAllowed || resp.StatusCode >= 500
	var detail string
	if bad {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
		detail = fmt.Sprintf("%s (path %s, query %q): %s", key, req.URL.EscapedPath(), redactQuery(req.URL.Query()), bytes.TrimSpace(body))
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.counts[key]++
	if _, seen := rec.bad[key]; bad && !seen {
		rec.bad[key] = detail
		rec.t.Logf("serve answered %s", detail)
	}
	return nil
}

// proxyError answers 502 when serve could not be reached, and records it;
// a client that gave up (a /sync cut short as the test ends) is not an error.
func (rec *recorder) proxyError(w http.ResponseWriter, req *http.Request, err error) {
	if req.Context().Err() != nil {
		return
	}
	key := fmt.Sprintf("%s %s proxy error", req.Method, pathTemplate(req.URL.EscapedPath()))
	rec.mu.Lock()
	rec.counts[key]++
	if _, seen := rec.bad[key]; !seen {
		rec.bad[key] = fmt.Sprintf("%s: %v", key, err)
	}
	rec.mu.Unlock()
	w.WriteHeader(http.StatusBadGateway)
}

// report logs what the software asked for and fails the test on the bad
// answers.
func (rec *recorder) report() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	keys := make([]string, 0, len(rec.counts))
	for k := range rec.counts {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var all, bad strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&all, "\n  %4d× %s", rec.counts[k], k)
		if d, ok := rec.bad[k]; ok {
			fmt.Fprintf(&bad, "\n  %4d× %s", rec.counts[k], d)
		}
	}
	rec.t.Logf("requests made to serve:%s", all.String())
	if bad.Len() > 0 {
		rec.t.Errorf("serve answered with 404, 405 or 5xx (count, then the first such request):%s", bad.String())
	}
}

func redactQuery(q url.Values) string {
	q.Del("access_token")
	return q.Encode()
}

// Path segments that name a Matrix entity, and the segment that follows a
// fixed one (a transaction ID, a media ID), become placeholders.
var (
	sigilTemplates = map[byte]string{'!': "{roomId}", '@': "{userId}", '#': "{roomAlias}", '$': "{eventId}"}
	afterTemplates = []struct {
		prev *regexp.Regexp
		name string
	}{
		{regexp.MustCompile(`^(send|sendToDevice)/[^/]+$`), "{txnId}"},
		{regexp.MustCompile(`^redact/\{eventId\}$`), "{txnId}"},
		{regexp.MustCompile(`^(download|thumbnail|upload)/[^/]+$`), "{mediaId}"},
		{regexp.MustCompile(`^(download|thumbnail|upload)$`), "{serverName}"},
		{regexp.MustCompile(`^appservice$`), "{appserviceId}"},
		{regexp.MustCompile(`^(filter)$`), "{filterId}"},
		{regexp.MustCompile(`^(transactions)$`), "{txnId}"},
		{regexp.MustCompile(`^(devices)$`), "{deviceId}"},
	}
)

func pathTemplate(escaped string) string {
	segs := strings.Split(escaped, "/")
	out := make([]string, len(segs))
	for i, s := range segs {
		out[i] = s
		u, err := url.PathUnescape(s)
		if err != nil || u == "" {
			continue
		}
		if name, ok := sigilTemplates[u[0]]; ok {
			out[i] = name
			continue
		}
		var prev string
		if i >= 2 {
			prev = out[i-2] + "/" + out[i-1]
		}
		for _, a := range afterTemplates {
			if i >= 1 && (a.prev.MatchString(prev) || a.prev.MatchString(out[i-1])) {
				out[i] = a.name
				break
			}
		}
	}
	return strings.Join(out, "/")
}

// stub is a running `asdispatch serve` behind a recorder.
type stub struct {
	URL  string // the recorder's address: give this to the software
	rec  *recorder
	dir  string
	bin  string
	regs []string
}

// newStub prepares a data dir and a recorder; call start once the
// registrations are written.
func newStub(t *testing.T) *stub {
	t.Helper()
	rec := newRecorder(t)
	return &stub{URL: rec.URL, rec: rec, dir: t.TempDir(), bin: buildBinary(t)}
}

// addRegistration writes an AS registration file and adds it to the config.
func (s *stub) addRegistration(t *testing.T, name, yaml string) string {
	t.Helper()
	p := filepath.Join(s.dir, name+"-registration.yaml")
	if err := os.WriteFile(p, []byte(yaml), 0o600); err != nil {
		t.Fatal(err)
	}
	s.regs = append(s.regs, p)
	return p
}

// start writes the config and runs serve.
func (s *stub) start(t *testing.T) {
	t.Helper()
	config := filepath.Join(s.dir, "homeserver.yaml")
	body := fmt.Sprintf("server_name: localhost\nlisten: 127.0.0.1:0\ndata_dir: %s\napp_service_config_files: [%s]\nappservice:\n  retry_initial: 50ms\n  retry_max: 500ms\n",
		filepath.Join(s.dir, "data"), strings.Join(s.regs, ", "))
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	hs, _ := startServe(t, s.bin, config)
	s.rec.setTarget(hs)
}

// freePort picks a port on 127.0.0.1 for software that wants a port in its
// config rather than a listener.
func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func TestPathTemplate(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"/_matrix/client/v3/rooms/%21abc%3Alocalhost/send/m.room.message/txn1", "/_matrix/client/v3/rooms/{roomId}/send/m.room.message/{txnId}"},
		{"/_matrix/client/v3/rooms/!abc:localhost/state/m.room.power_levels/", "/_matrix/client/v3/rooms/{roomId}/state/m.room.power_levels/"},
		{"/_matrix/client/v3/profile/%40bot%3Alocalhost/displayname", "/_matrix/client/v3/profile/{userId}/displayname"},
		{"/_matrix/client/v3/rooms/!r:l/redact/$e/t9", "/_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}"},
		{"/_matrix/client/v1/media/download/localhost/abcd", "/_matrix/client/v1/media/download/{serverName}/{mediaId}"},
		{"/_matrix/client/v3/user/@a:l/filter/12", "/_matrix/client/v3/user/{userId}/filter/{filterId}"},
		{"/_matrix/client/v3/directory/room/%23alias%3Alocalhost", "/_matrix/client/v3/directory/room/{roomAlias}"},
		{"/_matrix/client/v3/sync", "/_matrix/client/v3/sync"},
		{"/_matrix/client/v3/devices/Q228VJAQ58", "/_matrix/client/v3/devices/{deviceId}"},
	} {
		if got := pathTemplate(c.in); got != c.want {
			t.Errorf("pathTemplate(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// matrixUser is a regular Matrix user on the stub, driven by mautrix-go's
// client, who watches their rooms through /sync.
type matrixUser struct {
	*mautrix.Client
	mu     sync.Mutex
	events []*event.Event // timeline and state of joined rooms, in /sync order
	invite []id.RoomID
	err    error     // of the last /sync
	errAt  time.Time // since when /sync has been failing
}

// newMatrixUser registers localpart on the stub and starts a /sync loop that
// runs until the test ends.
func newMatrixUser(t *testing.T, hs, localpart string) *matrixUser {
	t.Helper()
	cli, err := mautrix.NewClient(hs, "", "")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	resp, _, err := cli.Register(ctx, &mautrix.ReqRegister[any]{Username: localpart, Password: "correct horse " + localpart})
	if err != nil {
		t.Fatalf("register %s: %v", localpart, err)
	}
	cli.SetCredentials(resp.UserID, resp.AccessToken)
	u := &matrixUser{Client: cli}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	go func() {
		defer close(done)
		since := ""
		for ctx.Err() == nil {
			res, err := cli.SyncRequest(ctx, 5000, since, "", false, event.PresenceOnline)
			if err != nil {
				if ctx.Err() == nil {
					u.mu.Lock()
					if u.err == nil {
						u.errAt = time.Now()
					}
					u.err = err
					u.mu.Unlock()
					time.Sleep(200 * time.Millisecond)
				}
				continue
			}
			since = res.NextBatch
			u.mu.Lock()
			u.err = nil
			for roomID, room := range res.Rooms.Join {
				for _, evts := range [][]*event.Event{room.State.Events, room.Timeline.Events} {
					for _, evt := range evts {
						evt.RoomID = roomID
						_ = evt.Content.ParseRaw(evt.Type)
						u.events = append(u.events, evt)
					}
				}
			}
			for roomID := range res.Rooms.Invite {
				u.invite = append(u.invite, roomID)
			}
			u.mu.Unlock()
		}
	}()
	return u
}

// waitEvent waits until /sync has shown an event in room that match accepts.
func (u *matrixUser) waitEvent(t *testing.T, room id.RoomID, what string, match func(*event.Event) bool) *event.Event {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		u.mu.Lock()
		for _, evt := range u.events {
			if evt.RoomID == room && match(evt) {
				u.mu.Unlock()
				return evt
			}
		}
		n, syncErr, failingSince := len(u.events), u.err, u.errAt
		u.mu.Unlock()
		if time.Now().After(deadline) || (syncErr != nil && time.Since(failingSince) > 10*time.Second) {
			t.Fatalf("%s never saw %s in %s through /sync (%d events seen; last /sync error: %v)", u.UserID, what, room, n, syncErr)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// messageFrom matches an m.room.message sent by sender whose body contains
// every one of the strings.
func messageFrom(sender id.UserID, contains ...string) func(*event.Event) bool {
	return func(evt *event.Event) bool {
		if evt.Type != event.EventMessage || evt.Sender != sender {
			return false
		}
		body := evt.Content.AsMessage().Body
		for _, s := range contains {
			if !strings.Contains(body, s) {
				return false
			}
		}
		return true
	}
}

// membership matches user's m.room.member event with that membership.
func membership(user id.UserID, m event.Membership) func(*event.Event) bool {
	return func(evt *event.Event) bool {
		return evt.Type == event.StateMember && evt.GetStateKey() == string(user) && evt.Content.AsMember().Membership == m
	}
}

// logFile is where a child process's output goes; its tail is logged if the
// test fails.
func logFile(t *testing.T, name string) *os.File {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), name+".log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(f.Name())
			if len(b) > 20000 {
				b = b[len(b)-20000:]
			}
			t.Logf("%s output (tail):\n%s", name, b)
		}
		f.Close()
	})
	return f
}

// stopProcess ends a child with SIGTERM, then SIGKILL after a grace period.
func stopProcess(cmd *exec.Cmd) {
	if cmd.Process == nil {
		return
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}
