package queue

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/asdispatch/asdispatch/txnstore"
)

func heapAlloc() int64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return int64(m.HeapAlloc)
}

// TestASMemory bounds what an AS costs the Queues: its slot, started and
// idle, and again once it delivered a transaction (the machine keeps
// nothing of it). The logger is a JSON one: a per-AS zap.With copied its
// encoder, 1.3 KiB an AS. The deliveries come in waves of 100 ASes so the
// goroutines of the sends in flight (the runtime keeps their g's) stay
// out of the figure.
func TestASMemory(t *testing.T) {
	const ases, wave = 2000, 100
	log := zap.New(zapcore.NewCore(zapcore.NewJSONEncoder(zap.NewProductionEncoderConfig()), zapcore.AddSync(io.Discard), zap.DebugLevel))
	h := newHarness(t, filepath.Join(t.TempDir(), "q.db"), Options{Logger: log})
	defer h.close()
	// An AS server that only counts: a fakeAS keeps every attempt.
	var got atomic.Int64
	srv := &fakeAS{token: "hs"}
	srv.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		got.Add(1)
		w.Write([]byte("{}"))
	}))
	t.Cleanup(srv.srv.Close)
	keys := make([]txnstore.ASKey, ases)
	targets := make([]AS, ases)
	for i := range keys {
		id := fmt.Sprintf("as%d", i)
		k, err := h.store.EnsureAS(t.Context(), id)
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = k
		targets[i] = srv.target(id)
		targets[i].Key = k
	}
	settledGoroutines()
	before := heapAlloc()
	for _, as := range targets {
		h.q.Start(as)
	}
	settledGoroutines()
	idle := (heapAlloc() - before) / ases
	for i := 0; i < ases; i += wave {
		h.appendEvents(txnstore.KindEvent, keys[i:i+wave], fmt.Sprintf("e%d", i))
		waitFor(t, "the wave's events", func() bool { return got.Load() >= int64(i+wave) })
	}
	settledGoroutines()
	h.q.client.CloseIdleConnections()
	settledGoroutines()
	after := (heapAlloc() - before) / ases
	// Measured: ~1,900 and ~2,100 bytes (3,600 and 4,400 before the
	// logger was made on first use, the last transaction let go and the
	// per-AS context replaced by one an op).
	const most = 2600
	if idle > most || after > most {
		t.Errorf("per AS: %d bytes started and idle, %d after a delivery; want at most %d", idle, after, most)
	} else {
		t.Logf("per AS: %d bytes started and idle, %d after a delivery", idle, after)
	}
}
