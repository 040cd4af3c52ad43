package asapi

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/asdispatch/asdispatch/secret"
)

func TestPutTransactionRequest(t *testing.T) {
	var got *http.Request
	var body []byte
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got, body = r, must(io.ReadAll(r.Body))
		w.Write([]byte("{}"))
	}))
	defer srv.Close()
	c := New(Options{})
	sent := []byte(`{"events":[{"b":"\u00e9  "}]}`)
	if err := c.PutTransaction(context.Background(), Target{ID: "a", URL: srv.URL + "/", HSToken: secret.New("hs-tok")}, "12/x", sent); err != nil {
		t.Fatal(err)
	}
	if got.Method != http.MethodPut || got.URL.EscapedPath() != "/_matrix/app/v1/transactions/12%2Fx" {
		t.Errorf("request %s %s", got.Method, got.URL.EscapedPath())
	}
	if got.Header.Get("Authorization") != "Bearer hs-tok" || got.Header.Get("Content-Type") != "application/json" {
		t.Errorf("headers %v", got.Header)
	}
	if got.URL.Query().Get("access_token") != "" {
		t.Error("access_token sent outside legacy mode")
	}
	if string(body) != string(sent) {
		t.Errorf("body re-encoded: %s", body)
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

func TestPutTransactionErrors(t *testing.T) {
	status := func(code int) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(code)
			w.Write([]byte(`{"errcode":"M_X","error":"echo hs-secret"}`))
		}
	}
	tests := []struct {
		name    string
		handler http.HandlerFunc
		want    []error
	}{
		{"500", status(500), nil},
		{"401 is a token mismatch", status(401), []error{ErrTokenMismatch}},
		{"403 is a token mismatch", status(403), []error{ErrTokenMismatch}},
		{"413", status(413), []error{ErrTooLarge}},
		{"timeout", func(w http.ResponseWriter, r *http.Request) { time.Sleep(300 * time.Millisecond) }, []error{ErrTimeout}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(tt.handler)
			defer srv.Close()
			c := New(Options{TxnTimeout: 100 * time.Millisecond})
			err := c.PutTransaction(context.Background(), Target{ID: "bridge", URL: srv.URL, HSToken: secret.New("hs-secret")}, "1", []byte("{}"))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tt.want {
				if !errors.Is(err, w) {
					t.Errorf("%v is not %v", err, w)
				}
			}
			if strings.Contains(err.Error(), "hs-secret") {
				t.Errorf("error leaks the token: %v", err)
			}
			if !strings.Contains(err.Error(), "bridge") {
				t.Errorf("error does not name the AS: %v", err)
			}
		})
	}
	t.Run("refused", func(t *testing.T) {
		l, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := l.Addr().String()
		l.Close()
		err := New(Options{}).PutTransaction(context.Background(), Target{ID: "gone", URL: "http://" + addr}, "1", []byte("{}"))
		if !errors.Is(err, ErrConnection) {
			t.Errorf("%v is not ErrConnection", err)
		}
	})
	t.Run("no url", func(t *testing.T) {
		if err := New(Options{}).PutTransaction(context.Background(), Target{ID: "n"}, "1", nil); !errors.Is(err, ErrNoURL) {
			t.Errorf("%v is not ErrNoURL", err)
		}
	})
}

func TestLegacyFallback(t *testing.T) {
	var paths []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		paths = append(paths, r.URL.Path+"?"+r.URL.RawQuery)
		if strings.HasPrefix(r.URL.Path, "/_matrix/") {
			w.WriteHeader(404)
			w.Write([]byte(`{"errcode":"M_UNRECOGNIZED"}`))
			return
		}
		w.Write([]byte("{}"))
	}))
	defer srv.Close()
	err := New(Options{}).PutTransaction(context.Background(), Target{ID: "old", URL: srv.URL, HSToken: secret.New("tok"), Legacy: true}, "7", []byte("{}"))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"/_matrix/app/v1/transactions/7?access_token=tok", "/transactions/7?access_token=tok"}
	if len(paths) != 2 || paths[0] != want[0] || paths[1] != want[1] {
		t.Errorf("paths %v, want %v", paths, want)
	}
}

func TestConnectionReuse(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(500)
		w.Write([]byte(strings.Repeat("x", 2000)))
	}))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	defer srv.Close()
	c := New(Options{})
	for i := 0; i < 10; i++ {
		_ = c.PutTransaction(context.Background(), Target{ID: "a", URL: srv.URL}, "1", []byte("{}"))
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("10 sequential requests used %d connections, want 1", n)
	}
}

func TestRetryAfter(t *testing.T) {
	tests := []struct {
		name   string
		header string
		body   string
		want   time.Duration
	}{
		{"header in seconds", "3", `{}`, 3 * time.Second},
		{"retry_after_ms", "", `{"errcode":"M_LIMIT_EXCEEDED","retry_after_ms":1500}`, 1500 * time.Millisecond},
		{"header wins", "2", `{"retry_after_ms":10}`, 2 * time.Second},
		{"nothing said", "", `not json`, 0},
		{"HTTP date ignored", "Wed, 21 Oct 2015 07:28:00 GMT", `{}`, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tt.header != "" {
					w.Header().Set("Retry-After", tt.header)
				}
				w.WriteHeader(http.StatusTooManyRequests)
				w.Write([]byte(tt.body))
			}))
			defer srv.Close()
			err := New(Options{}).PutTransaction(context.Background(), Target{ID: "a", URL: srv.URL, HSToken: secret.New("t")}, "1", []byte("{}"))
			var se *StatusError
			if !errors.As(err, &se) || se.Status != http.StatusTooManyRequests {
				t.Fatalf("err %v, want a 429 StatusError", err)
			}
			if se.RetryAfter != tt.want {
				t.Errorf("RetryAfter %v, want %v", se.RetryAfter, tt.want)
			}
		})
	}
}

// TestLegacyTokenNeverInErrors sends with ?access_token= through every
// request kind and every way a request fails, with tokens that URL encoding
// and Go quoting change, and looks for the token in any form in the whole
// error chain.
func TestLegacyTokenNeverInErrors(t *testing.T) {
	tokens := []string{"Zm9v+YmFy/YmF6==", "100% s3cret &x=y", "tök€n \"q\" \\ é", "a%2Fb\tc"}
	refused := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		return "http://" + addr
	}
	servers := []struct {
		name    string
		handler http.HandlerFunc // nil: nothing listens
	}{
		{"refused", nil},
		{"timeout", func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-time.After(2 * time.Second):
			}
		}},
		{"bad status echoing the request", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusBadGateway)
			fmt.Fprintf(w, "%s %s %s %q %s %s", r.RequestURI, r.URL, r.URL.RawQuery, r.URL.Query().Get("access_token"), r.Header.Get("Authorization"),
				lowerEscapes(r.URL.RawQuery))
		}},
		{"reset", func(w http.ResponseWriter, r *http.Request) {
			conn, _, err := w.(http.Hijacker).Hijack()
			if err != nil {
				return
			}
			if tc, ok := conn.(*net.TCPConn); ok {
				tc.SetLinger(0) // RST instead of FIN
			}
			conn.Close()
		}},
		{"bad url", nil},
	}
	ops := []struct {
		name string
		call func(*Client, Target) error
	}{
		{"transaction", func(c *Client, tg Target) error {
			return c.PutTransaction(context.Background(), tg, "1", []byte("{}"))
		}},
		{"user query", func(c *Client, tg Target) error {
			_, err := c.QueryUser(context.Background(), tg, "@a:hs")
			return err
		}},
		{"alias query", func(c *Client, tg Target) error {
			_, err := c.QueryAlias(context.Background(), tg, "#a:hs")
			return err
		}},
		{"ping", func(c *Client, tg Target) error {
			_, err := c.Ping(context.Background(), tg, "p1")
			return err
		}},
		{"third party", func(c *Client, tg Target) error {
			_, err := c.ThirdParty(context.Background(), tg, "user/irc", url.Values{"nick": {"x y"}})
			return err
		}},
	}
	c := New(Options{TxnTimeout: 150 * time.Millisecond, QueryTimeout: 150 * time.Millisecond, PingTimeout: 150 * time.Millisecond})
	for _, s := range servers {
		base := ""
		switch {
		case s.name == "bad url":
			base = "http://127.0.0.1:bad port"
		case s.handler == nil:
			base = refused()
		default:
			srv := httptest.NewServer(s.handler)
			defer srv.Close()
			base = srv.URL
		}
		for _, op := range ops {
			for _, tok := range tokens {
				t.Run(s.name+"/"+op.name+"/"+tok, func(t *testing.T) {
					tg := Target{ID: "legacy", URL: base, HSToken: secret.New(tok), ASToken: secret.New("as-" + tok), Legacy: true}
					err := op.call(c, tg)
					if err == nil {
						t.Fatal("no error")
					}
					for _, text := range errorTexts(err) {
						for _, f := range tokenForms(tok) {
							if strings.Contains(text, f) {
								t.Fatalf("error text leaks the token as %q: %s", f, text)
							}
						}
					}
				})
			}
		}
	}
}

// errorTexts prints err and everything it wraps in every usual way.
func errorTexts(err error) []string {
	var out []string
	var walk func(error)
	walk = func(e error) {
		if e == nil {
			return
		}
		out = append(out, e.Error(), fmt.Sprintf("%+v", e), fmt.Sprintf("%#v", e))
		if ue, ok := e.(*url.Error); ok {
			out = append(out, ue.URL)
		}
		switch u := e.(type) {
		case interface{ Unwrap() error }:
			walk(u.Unwrap())
		case interface{ Unwrap() []error }:
			for _, w := range u.Unwrap() {
				walk(w)
			}
		}
	}
	walk(err)
	return out
}

// tokenForms are the token and its encodings that an error might quote.
func tokenForms(tok string) []string {
	q := strconv.Quote(tok)
	return []string{tok, url.QueryEscape(tok), url.PathEscape(tok), q[1 : len(q)-1],
		lowerEscapes(url.QueryEscape(tok)), lowerEscapes(url.PathEscape(tok))}
}

// lowerEscapes writes %2B as %2b, as some servers echo escapes.
func lowerEscapes(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			b.WriteString(strings.ToLower(s[i : i+3]))
			i += 2
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// TestErrorBodyIsText: what is kept of an AS's error answer goes into
// LastError and the store, so it must be valid UTF-8 without NUL, cut on a
// rune boundary, with the tokens scrubbed before the cut.
func TestErrorBodyIsText(t *testing.T) {
	x := strings.Repeat("x", 511)
	tests := []struct {
		name string
		body string
		want string
	}{
		{"rune across the cut", x + "é and more", x},
		{"4-byte rune across the cut", strings.Repeat("x", 510) + "😀", strings.Repeat("x", 510)},
		{"NUL", "bad\x00body", "badbody"},
		{"invalid UTF-8", "a\xff\xfeb\xc3", "ab"},
		{"token across the cut", strings.Repeat("y", 500) + "hs-0123456789abcdef-secret tail", strings.Repeat("y", 500) + "[REDACTED] t"},
		{"short text kept", `{"errcode":"M_UNKNOWN","error":"é"}`, `{"errcode":"M_UNKNOWN","error":"é"}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(500)
				w.Write([]byte(tt.body))
			}))
			defer srv.Close()
			err := New(Options{}).PutTransaction(context.Background(), Target{ID: "a", URL: srv.URL, HSToken: secret.New("hs-0123456789abcdef-secret")}, "1", []byte("{}"))
			var se *StatusError
			if !errors.As(err, &se) {
				t.Fatalf("err %v, want a StatusError", err)
			}
			if se.Body != tt.want {
				t.Errorf("Body %q, want %q", se.Body, tt.want)
			}
			if !utf8.ValidString(se.Body) || strings.ContainsRune(se.Body, 0) || len(se.Body) > maxErrorBody {
				t.Errorf("Body is not storable text: %q", se.Body)
			}
			if msg := err.Error(); !utf8.ValidString(msg) || strings.ContainsRune(msg, 0) {
				t.Errorf("error text is not valid: %q", msg)
			}
		})
	}
}
