package queries

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/asdispatch/asdispatch/asapi"
	"github.com/asdispatch/asdispatch/registry"
)

// as is an AS on 127.0.0.1 whose answers a test sets per path.
type as struct {
	srv    *httptest.Server
	mu     sync.Mutex
	calls  []string // escaped paths
	answer func(path string) (int, string)
	delay  time.Duration
}

func newAS(t *testing.T, answer func(path string) (int, string)) *as {
	a := &as{answer: answer}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.calls = append(a.calls, r.URL.EscapedPath()+"?"+r.URL.RawQuery)
		d := a.delay
		a.mu.Unlock()
		time.Sleep(d)
		code, body := a.answer(r.URL.Path)
		w.WriteHeader(code)
		w.Write([]byte(body))
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *as) got() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]string(nil), a.calls...)
}

func answer(code int) func(string) (int, string) {
	return func(string) (int, string) { return code, "{}" }
}

func reg(id, url, users string, exclusive bool, extra string) string {
	if url == "" {
		url = "null"
	}
	return fmt.Sprintf("id: %s\nurl: %s\nas_token: as-%s\nhs_token: hs-%s\nsender_localpart: %sbot\n%snamespaces:\n  users: [{exclusive: %v, regex: %q}]\n  aliases: [{exclusive: %v, regex: %q}]\n",
		id, url, id, id, id, extra, exclusive, users, exclusive, strings.Replace(users, "@", "#", 1))
}

func service(t *testing.T, regs ...string) (*Service, *[]string) {
	var parsed []*registry.Registration
	for i, y := range regs {
		r, _, err := registry.Parse(fmt.Sprintf("r%d.yaml", i), []byte(y))
		if err != nil {
			t.Fatal(err)
		}
		parsed = append(parsed, r)
	}
	set, _, err := registry.NewSet("hs", parsed)
	if err != nil {
		t.Fatal(err)
	}
	var woken []string
	return New(Config{Registry: registry.NewRegistry(set), Client: asapi.New(asapi.Options{QueryTimeout: 200 * time.Millisecond, PingTimeout: 200 * time.Millisecond}),
		Wake: func(id string) { woken = append(woken, id) }}), &woken
}

func TestQueryUser(t *testing.T) {
	tests := []struct {
		name      string
		shared    func(string) (int, string)
		owner     func(string) (int, string)
		want      Result
		sharedHit bool // the shared AS was asked
	}{
		{"owner says yes", answer(200), answer(200), Result{true, "owner"}, false},
		{"owner says no, shared yes", answer(200), answer(404), Result{true, "shared"}, true},
		{"owner fails, shared asked", answer(200), answer(500), Result{true, "shared"}, true},
		{"nobody", answer(404), answer(404), Result{}, true},
		{"errors answer no", answer(502), answer(401), Result{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			shared, owner := newAS(t, tt.shared), newAS(t, tt.owner)
			s, _ := service(t, reg("shared", shared.srv.URL, "@irc_.*", false, ""), reg("owner", owner.srv.URL, "@irc_.*", true, ""))
			got, err := s.QueryUser(context.Background(), "@irc_bob:hs")
			if err != nil || got != tt.want {
				t.Fatalf("QueryUser = %+v, %v; want %+v", got, err, tt.want)
			}
			if len(owner.got()) != 1 || owner.got()[0] != "/_matrix/app/v1/users/@irc_bob:hs?" {
				t.Errorf("owner calls %v", owner.got())
			}
			if (len(shared.got()) > 0) != tt.sharedHit {
				t.Errorf("shared AS asked: %v", shared.got())
			}
		})
	}
}

func TestQueryEscapingAndNullURL(t *testing.T) {
	a := newAS(t, answer(404))
	s, _ := service(t, reg("a", a.srv.URL, "@.*", false, ""), reg("nourl", "", "@.*", false, ""))
	ctx := context.Background()
	for _, id := range []string{"@a/b:hs", "@q?x:hs", "@p%c:hs"} {
		s.QueryUser(ctx, id)
	}
	s.QueryAlias(ctx, "#chan#x:hs")
	want := []string{"/_matrix/app/v1/users/@a%2Fb:hs?", "/_matrix/app/v1/users/@q%3Fx:hs?", "/_matrix/app/v1/users/@p%25c:hs?", "/_matrix/app/v1/rooms/%23chan%23x:hs?"}
	got := a.got()
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("paths\n got %v\nwant %v", got, want)
	}
}

func TestTimeoutThenNext(t *testing.T) {
	slow, ok := newAS(t, answer(200)), newAS(t, answer(200))
	slow.delay = time.Second
	s, _ := service(t, reg("slow", slow.srv.URL, "@x_.*", true, ""), reg("ok", ok.srv.URL, "@x_.*", false, ""))
	start := time.Now()
	got, _ := s.QueryUser(context.Background(), "@x_1:hs")
	if got != (Result{true, "ok"}) {
		t.Errorf("got %+v", got)
	}
	if time.Since(start) > 900*time.Millisecond {
		t.Errorf("query waited %v for a slow AS, timeout is 200ms", time.Since(start))
	}
}

func TestSingleflightAndNegativeCache(t *testing.T) {
	a := newAS(t, answer(404))
	a.delay = 50 * time.Millisecond
	s, _ := service(t, reg("a", a.srv.URL, "@x_.*", true, ""))
	var wg sync.WaitGroup
	var yes atomic.Int32
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if r, _ := s.QueryUser(context.Background(), "@x_1:hs"); r.Exists {
				yes.Add(1)
			}
		}()
	}
	wg.Wait()
	if n := len(a.got()); n != 1 || yes.Load() != 0 {
		t.Fatalf("20 concurrent queries made %d requests (%d yes), want 1", n, yes.Load())
	}
	s.QueryUser(context.Background(), "@x_1:hs")
	if n := len(a.got()); n != 1 {
		t.Errorf("negative answer not cached: %d requests", n)
	}
	a.mu.Lock()
	a.answer = answer(200)
	a.mu.Unlock()
	s.NoteUserRegistered("@x_1:hs")
	if r, _ := s.QueryUser(context.Background(), "@x_1:hs"); !r.Exists {
		t.Errorf("after NoteUserRegistered the AS was not asked again: %v", a.got())
	}
}

func TestLegacyFallback(t *testing.T) {
	a := newAS(t, func(p string) (int, string) {
		if strings.HasPrefix(p, "/_matrix") {
			return 404, `{"errcode":"M_UNRECOGNIZED"}`
		}
		return 200, "{}"
	})
	s, _ := service(t, reg("old", a.srv.URL, "@x_.*", true, "asdispatch.legacy: true\n"))
	if r, _ := s.QueryUser(context.Background(), "@x_1:hs"); !r.Exists {
		t.Fatalf("legacy AS not found: %v", a.got())
	}
	if got := a.got(); len(got) != 2 || got[1] != "/users/@x_1:hs?access_token=hs-old" {
		t.Errorf("calls %v", got)
	}
}

func TestPing(t *testing.T) {
	slow := newAS(t, answer(200))
	slow.delay = time.Second
	tests := []struct {
		name   string
		url    string
		code   string
		status int
	}{
		{"ok", newAS(t, answer(200)).srv.URL, "", 0},
		{"bad status", newAS(t, func(string) (int, string) { return 500, "oops" }).srv.URL, "M_BAD_STATUS", 502},
		{"timeout", slow.srv.URL, "M_CONNECTION_TIMEOUT", 504},
		{"refused", "http://127.0.0.1:1", "M_CONNECTION_FAILED", 502},
		{"no url", "", "M_URL_NOT_SET", 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, woken := service(t, reg("a", tt.url, "@x_.*", true, ""))
			_, err := s.Ping(context.Background(), "a", "txn1")
			var pe *PingError
			if tt.code == "" {
				if err != nil || len(*woken) != 1 {
					t.Fatalf("ping = %v, woken %v", err, *woken)
				}
				return
			}
			if !errors.As(err, &pe) || pe.Code != tt.code || pe.Status != tt.status {
				t.Fatalf("ping = %v, want %s %d", err, tt.code, tt.status)
			}
			if tt.code == "M_BAD_STATUS" && (pe.ASStatus != 500 || pe.ASBody != "oops") {
				t.Errorf("bad status details %+v", pe)
			}
		})
	}
}

func TestThirdPartyMerge(t *testing.T) {
	one := newAS(t, func(p string) (int, string) {
		if strings.HasPrefix(p, "/_matrix/app/v1/thirdparty/protocol/") {
			return 200, `{"user_fields":["nick"],"instances":[{"network_id":"libera","desc":"Libera"},{"desc":"no id"}]}`
		}
		return 200, `[{"userid":"@irc_a:hs","protocol":"irc","fields":{"nick":"a"}},{"bad":"row"}]`
	})
	two := newAS(t, func(p string) (int, string) {
		if strings.HasPrefix(p, "/_matrix/app/v1/thirdparty/protocol/") {
			return 200, `{"user_fields":["other"],"instances":[{"network_id":"oftc","desc":"OFTC"}]}`
		}
		return 200, `[{"userid":"@irc_b:hs","protocol":"irc","fields":{"nick":"b"}}]`
	})
	s, _ := service(t, reg("one", one.srv.URL, "@irc_.*", false, "protocols: [irc]\n"), reg("two", two.srv.URL, "@irc2_.*", false, "protocols: [irc]\n"))
	meta, ok := s.Protocol(context.Background(), "irc")
	if !ok {
		t.Fatal("no protocol")
	}
	js, _ := json.Marshal(meta)
	for _, want := range []string{`"instance_id":"one|libera"`, `"instance_id":"two|oftc"`, `"user_fields":["nick"]`} {
		if !strings.Contains(string(js), want) {
			t.Errorf("merged protocol %s lacks %s", js, want)
		}
	}
	if strings.Contains(string(js), "no id") {
		t.Errorf("instance without network_id kept: %s", js)
	}
	s.Protocol(context.Background(), "irc")
	if n := len(one.got()); n != 1 {
		t.Errorf("protocol metadata not cached: %d requests", n)
	}
	users := s.Users(context.Background(), "irc", url.Values{"nick": {"a"}})
	if len(users) != 2 {
		t.Errorf("users %s", users)
	}
	if got := one.got()[1]; got != "/_matrix/app/v1/thirdparty/user/irc?nick=a" {
		t.Errorf("user lookup path %s", got)
	}
}

// serviceWith is service with a Config to adjust.
func serviceWith(t *testing.T, adjust func(*Config), regs ...string) *Service {
	t.Helper()
	s, _ := service(t, regs...)
	adjust(&s.cfg)
	return New(s.cfg)
}

// TestNegativeCacheBoundedAndDefinite: only a definite 404 from every AS
// asked is remembered, for at most NegativeTTL and among at most
// NegativeSize answers; an AS's error is asked again next time.
func TestNegativeCacheBoundedAndDefinite(t *testing.T) {
	slow := func(string) (int, string) { time.Sleep(400 * time.Millisecond); return 404, "{}" }
	tests := []struct {
		name string
		// answers of the exclusive owner and of a shared AS ("" for none)
		owner, shared func(string) (int, string)
		cached        bool
	}{
		{"404 from the only AS", answer(404), nil, true},
		{"404 from both", answer(404), answer(404), true},
		{"500", answer(500), nil, false},
		{"401", answer(401), nil, false},
		{"404 then an error", answer(404), answer(502), false},
		{"timeout", slow, nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			owner := newAS(t, tt.owner)
			regs := []string{reg("owner", owner.srv.URL, "@x_.*", true, "")}
			var shared *as
			if tt.shared != nil {
				shared = newAS(t, tt.shared)
				regs = append(regs, reg("shared", shared.srv.URL, "@x_.*", false, ""))
			}
			s := serviceWith(t, func(*Config) {}, regs...)
			for i := 0; i < 2; i++ {
				if r, err := s.QueryUser(context.Background(), "@x_1:hs"); err != nil || r.Exists {
					t.Fatalf("QueryUser = %+v, %v", r, err)
				}
			}
			want := 2
			if tt.cached {
				want = 1
			}
			if n := len(owner.got()); n != want {
				t.Errorf("2 queries asked the AS %d times, want %d", n, want)
			}
		})
	}
	t.Run("size", func(t *testing.T) {
		a := newAS(t, answer(404))
		s := serviceWith(t, func(c *Config) { c.NegativeSize = 2 }, reg("a", a.srv.URL, "@x_.*", true, ""))
		ctx := context.Background()
		for _, u := range []string{"@x_1:hs", "@x_2:hs", "@x_3:hs", "@x_3:hs", "@x_2:hs", "@x_1:hs"} {
			s.QueryUser(ctx, u)
		}
		// x_1 was pushed out by x_2 and x_3: asked again; x_2, x_3 were not.
		if n := len(a.got()); n != 4 {
			t.Errorf("AS asked %d times, want 4: %v", n, a.got())
		}
		for i := 0; i < 1000; i++ {
			s.QueryAlias(ctx, fmt.Sprintf("#x_%d:hs", i))
		}
		if n := s.negative.Len(); n > 2 {
			t.Errorf("negative cache holds %d answers, bound is 2", n)
		}
	})
	t.Run("ttl", func(t *testing.T) {
		a := newAS(t, answer(404))
		s := serviceWith(t, func(c *Config) { c.NegativeTTL = 50 * time.Millisecond }, reg("a", a.srv.URL, "@x_.*", true, ""))
		s.QueryUser(context.Background(), "@x_1:hs")
		s.QueryUser(context.Background(), "@x_1:hs")
		time.Sleep(80 * time.Millisecond)
		s.QueryUser(context.Background(), "@x_1:hs")
		if n := len(a.got()); n != 2 {
			t.Errorf("AS asked %d times, want 2 (cached once, then expired)", n)
		}
	})
}

// TestProtocolIsTheCallersCopy: the map Protocol returns can be changed
// without changing what the next caller gets.
func TestProtocolIsTheCallersCopy(t *testing.T) {
	a := newAS(t, func(string) (int, string) {
		return 200, `{"user_fields":["nick"],"location_fields":["channel"],"field_types":{"nick":{"regexp":".*"}},"instances":[{"network_id":"libera","fields":{"net":"l"}}]}`
	})
	s, _ := service(t, reg("a", a.srv.URL, "@irc_.*", false, "protocols: [irc]\n"))
	ctx := context.Background()
	first, ok := s.Protocol(ctx, "irc")
	if !ok {
		t.Fatal("no protocol")
	}
	want, _ := json.Marshal(first)
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			meta, _ := s.Protocol(ctx, "irc")
			meta["user_fields"].([]any)[0] = "changed"
			meta["field_types"].(map[string]any)["nick"] = nil
			inst := meta["instances"].([]any)[0].(map[string]any)
			inst["instance_id"] = "changed"
			inst["fields"].(map[string]any)["net"] = "changed"
			meta["instances"] = append(meta["instances"].([]any), "extra")
			delete(meta, "location_fields")
		}()
	}
	wg.Wait()
	again, _ := s.Protocol(ctx, "irc")
	if got, _ := json.Marshal(again); string(got) != string(want) {
		t.Errorf("cached protocol changed by a caller:\n got %s\nwant %s", got, want)
	}
	if n := len(a.got()); n != 1 {
		t.Errorf("protocol asked %d times, want 1 (cached)", n)
	}
}

// TestThirdPartyLookupForwardsOnlyDeclaredFields: a lookup passes on the
// protocol's declared fields and nothing else of the client's query.
func TestThirdPartyLookupForwardsOnlyDeclaredFields(t *testing.T) {
	a := newAS(t, func(p string) (int, string) {
		if strings.HasPrefix(p, "/_matrix/app/v1/thirdparty/protocol/") {
			return 200, `{"user_fields":["nick","server","access_token"],"location_fields":["channel"],"instances":[]}`
		}
		return 200, `[]`
	})
	s, _ := service(t, reg("a", a.srv.URL, "@irc_.*", false, "protocols: [irc]\n"))
	ctx := context.Background()
	client := url.Values{"nick": {"bob", "b0b"}, "server": {"libera"}, "channel": {"#c"}, "access_token": {"client-secret"},
		"user_id": {"@admin:hs"}, "other": {"x"}}
	s.Users(ctx, "irc", client)
	s.Locations(ctx, "irc", client)
	got := a.got()
	if len(got) != 3 {
		t.Fatalf("calls %v", got)
	}
	want := []string{
		"/_matrix/app/v1/thirdparty/user/irc?nick=bob&nick=b0b&server=libera",
		"/_matrix/app/v1/thirdparty/location/irc?channel=%23c",
	}
	if got[1] != want[0] || got[2] != want[1] {
		t.Errorf("lookups\n got %v\nwant %v", got[1:], want)
	}
	unknown := newAS(t, answer(500))
	s2, _ := service(t, reg("u", unknown.srv.URL, "@irc_.*", false, "protocols: [irc]\n"))
	if rows := s2.Users(ctx, "irc", client); len(rows) != 0 {
		t.Errorf("rows %s", rows)
	}
	for _, c := range unknown.got() {
		if strings.Contains(c, "client-secret") || strings.Contains(c, "thirdparty/user") {
			t.Errorf("asked %s without the protocol's fields", c)
		}
	}
}

// TestNoteDuringQueryNotUndone: a "no" that was being fetched when the AS
// created the user (NoteUserRegistered) is not remembered.
func TestNoteDuringQueryNotUndone(t *testing.T) {
	var created atomic.Bool
	entered, release := make(chan struct{}), make(chan struct{})
	a := newAS(t, func(string) (int, string) {
		if created.Load() {
			return 200, "{}"
		}
		close(entered)
		<-release // answers "no" after the user is created
		return 404, "{}"
	})
	s, _ := service(t, reg("a", a.srv.URL, "@x_.*", true, ""))
	ctx := context.Background()
	done := make(chan Result)
	go func() { r, _ := s.QueryUser(ctx, "@x_1:hs"); done <- r }()
	<-entered
	created.Store(true)
	s.NoteUserRegistered("@x_1:hs")
	close(release)
	if r := <-done; r.Exists {
		t.Fatalf("first answer %+v", r)
	}
	if r, _ := s.QueryUser(ctx, "@x_1:hs"); !r.Exists {
		t.Errorf("the \"no\" fetched before NoteUserRegistered was remembered after it")
	}
}
