package bench

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// asServer is one AS on 127.0.0.1 that checks the hs_token and counts the
// events it accepts, sampling their latency.
type asServer struct {
	token  string
	url    string
	events atomic.Int64
	txns   atomic.Int64 // transactions accepted
	// down makes it answer 503, as an AS that is restarting.
	down    atomic.Bool
	mu      sync.Mutex
	latency []time.Duration
	// bodies holds request body buffers (*bytes.Buffer): io.ReadAll's
	// growing (and zeroing) a 4 MiB catch-up body on each request cost the
	// in-process AS servers a sixth of a catch-up's CPU. The baseline and
	// the limit use the same servers.
	bodies sync.Pool
}

var tMarker = []byte(`"t":`)

func (a *asServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Authorization") != "Bearer "+a.token {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	if a.down.Load() {
		io.Copy(io.Discard, r.Body)
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	buf := a.readBody(r.Body, r.ContentLength)
	defer a.bodies.Put(buf)
	body := buf.Bytes()
	now := time.Now().UnixNano()
	var n int64
	var sample []time.Duration
	for rest := body; ; {
		i := bytes.Index(rest, tMarker)
		if i < 0 {
			break
		}
		rest = rest[i+len(tMarker):]
		j := bytes.IndexByte(rest, ',')
		if j < 0 {
			break
		}
		if n%8 == 0 {
			if t, err := strconv.ParseInt(string(rest[:j]), 10, 64); err == nil && t > 0 {
				sample = append(sample, time.Duration(now-t))
			}
		}
		n++
	}
	a.events.Add(n)
	a.txns.Add(1)
	if len(sample) > 0 {
		a.mu.Lock()
		a.latency = append(a.latency, sample...)
		a.mu.Unlock()
	}
	w.Write([]byte("{}"))
}

// readBody reads a body of n bytes (-1: unknown) into a pooled buffer,
// sized up front when n is known so it does not grow.
func (a *asServer) readBody(r io.Reader, n int64) *bytes.Buffer {
	buf, _ := a.bodies.Get().(*bytes.Buffer)
	if buf == nil {
		buf = new(bytes.Buffer)
	}
	buf.Reset()
	if n > 0 {
		buf.Grow(int(n) + bytes.MinRead) // ReadFrom wants MinRead free to see EOF
	}
	buf.ReadFrom(r)
	return buf
}

func (a *asServer) reset() {
	a.events.Store(0)
	a.txns.Store(0)
	a.mu.Lock()
	a.latency = a.latency[:0]
	a.mu.Unlock()
}

// servers are the ASes of a run: one HTTP server each, or, past
// Config.SharedServerAbove, one server routing /asN/... to AS N (each keeps
// its own URL and hs_token; 10,000 listeners would measure the kernel).
type servers struct {
	as     []*asServer
	https  []*http.Server
	shared bool
}

func startServers(n int, shared bool) (*servers, error) {
	s := &servers{as: make([]*asServer, n), shared: shared}
	listen := func(h http.Handler) (string, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", fmt.Errorf("bench: start AS: %w", err)
		}
		srv := &http.Server{Handler: h}
		s.https = append(s.https, srv)
		go srv.Serve(ln)
		return "http://" + ln.Addr().String(), nil
	}
	var base string
	if shared {
		var err error
		if base, err = listen(http.HandlerFunc(s.route)); err != nil {
			return nil, err
		}
	}
	for i := range s.as {
		a := &asServer{token: fmt.Sprintf("bench-hs-%d", i)}
		s.as[i] = a
		if shared {
			a.url = fmt.Sprintf("%s/as%d", base, i)
			continue
		}
		u, err := listen(a)
		if err != nil {
			s.close()
			return nil, err
		}
		a.url = u
	}
	return s, nil
}

// route sends /asN/_matrix/... to AS N.
func (s *servers) route(w http.ResponseWriter, r *http.Request) {
	p := strings.TrimPrefix(r.URL.Path, "/as")
	i, err := strconv.Atoi(p[:max(0, strings.IndexByte(p, '/'))])
	if err != nil || i < 0 || i >= len(s.as) {
		http.NotFound(w, r)
		return
	}
	s.as[i].ServeHTTP(w, r)
}

func (s *servers) close() {
	for _, h := range s.https {
		h.Close()
	}
}

func (s *servers) reset() {
	for _, a := range s.as {
		a.reset()
	}
}

func (s *servers) total() int64 {
	var n int64
	for _, a := range s.as {
		n += a.events.Load()
	}
	return n
}

func (s *servers) txns() int64 {
	var n int64
	for _, a := range s.as {
		n += a.txns.Load()
	}
	return n
}

// latencies returns every sampled latency, sorted.
func (s *servers) latencies() []time.Duration {
	var lat []time.Duration
	for _, a := range s.as {
		a.mu.Lock()
		lat = append(lat, a.latency...)
		a.mu.Unlock()
	}
	sortDurations(lat)
	return lat
}
