package homeserver

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/asdispatch/asdispatch/metrics"
	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// TestMetricsAndLogs runs a script against an AS that first rejects our
// token, then scrapes the metrics and reads every log line.
func TestMetricsAndLogs(t *testing.T) {
	accept := make(chan struct{})
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-accept:
		default:
			w.WriteHeader(http.StatusUnauthorized) // as mautrix answers a wrong token
			return
		}
		if strings.HasPrefix(r.URL.Path, "/_matrix/app/v1/users/") {
			w.WriteHeader(404)
		}
		w.Write([]byte("{}"))
	}))
	defer as.Close()
	r, _, err := registry.Parse("bridge.yaml", []byte(fmt.Sprintf(bridgeReg, as.URL)))
	if err != nil {
		t.Fatal(err)
	}
	set, _, _ := registry.NewSet("hs", []*registry.Registration{r})
	core, logs := observer.New(zap.DebugLevel)
	promReg := prometheus.NewRegistry()
	srv, err := New(context.Background(), Config{ServerName: "hs", DataDir: t.TempDir(), Registry: registry.NewRegistry(set),
		Logger: zap.New(core), Metrics: metrics.New(promReg),
		Queue: queue.Options{RetryInitial: 10 * time.Millisecond, RetryMax: 20 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	hs := httptest.NewServer(srv)
	e := &env{t: t, hs: hs, srv: srv}
	defer e.stop()

	_, ghost := e.do("POST", "/_matrix/client/v3/register", "as-bridge", map[string]any{"username": "br_ghost", "type": "m.login.application_service"})
	if ghost["user_id"] == nil {
		t.Fatalf("register: %v", ghost)
	}
	_, room := e.do("POST", "/_matrix/client/v3/createRoom?user_id="+url.QueryEscape("@br_ghost:hs"), "as-bridge", map[string]any{})
	roomID := room["room_id"].(string)
	for i := 0; i < 3; i++ {
		e.do("PUT", fmt.Sprintf("/_matrix/client/v3/rooms/%s/send/m.room.message/%d?user_id=%s", url.PathEscape(roomID), i, url.QueryEscape("@br_ghost:hs")), "as-bridge", map[string]any{"body": "x"})
	}
	time.Sleep(100 * time.Millisecond) // a few refused attempts
	close(accept)
	e.do("GET", "/_matrix/client/v3/profile/"+url.PathEscape("@br_unknown:hs"), "", nil) // a query answered 404

	value := func(name, label string) float64 {
		mfs, err := promReg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var sum float64
		for _, mf := range mfs {
			if mf.GetName() != name {
				continue
			}
			for _, m := range mf.GetMetric() {
				text := m.String()
				if label != "" && !strings.Contains(text, label) {
					continue
				}
				switch {
				case m.Counter != nil:
					sum += m.Counter.GetValue()
				case m.Gauge != nil:
					sum += m.Gauge.GetValue()
				}
			}
		}
		return sum
	}
	deadline := time.Now().Add(10 * time.Second)
	for value("asdispatch_backlog_events", "bridge") != 0 || value("asdispatch_items_sent_total", `value:"event"`) < 7 {
		if time.Now().After(deadline) {
			t.Fatalf("backlog %v, events sent %v", value("asdispatch_backlog_events", "bridge"), value("asdispatch_items_sent_total", `value:"event"`))
		}
		time.Sleep(10 * time.Millisecond)
	}
	checks := []struct {
		name, label string
		min, max    float64
	}{
		{"asdispatch_transactions_sent_total", "bridge", 1, 1e9},
		{"asdispatch_transactions_failed_total", "bridge", 1, 1e9},
		{"asdispatch_appservice_up", "bridge", 1, 1},
		{"asdispatch_appservice_consecutive_failures", "bridge", 0, 0},
		{"asdispatch_backlog_transactions", "bridge", 0, 0},
		{"asdispatch_queries_total", `value:"not_found"`, 1, 1},
		{"asdispatch_submitted_total", `value:"event"`, 7, 1e9},
		{"asdispatch_queued_deliveries_total", "", 7, 1e9},
	}
	for _, c := range checks {
		if v := value(c.name, c.label); v < c.min || v > c.max {
			t.Errorf("%s{%s} = %v, want in [%v, %v]", c.name, c.label, v, c.min, c.max)
		}
	}
	// Scrape /metrics as Prometheus would and parse the text.
	scrape := httptest.NewServer(promhttp.HandlerFor(promReg, promhttp.HandlerOpts{}))
	defer scrape.Close()
	resp, err := http.Get(scrape.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	var buf strings.Builder
	buf.Write(body)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(buf.String()))
	if err != nil {
		t.Fatalf("exposition does not parse: %v", err)
	}
	if sent := families["asdispatch_transactions_sent_total"]; sent == nil || sent.GetMetric()[0].GetCounter().GetValue() < 1 {
		t.Errorf("scraped transactions_sent_total = %v", sent)
	}

	var sawMismatch, sawUp bool
	for _, entry := range logs.All() {
		line := entry.Message + fmt.Sprint(entry.ContextMap())
		for _, secret := range []string{"as-bridge", "hs-bridge"} {
			if strings.Contains(line, secret) {
				t.Errorf("log line leaks a token: %s", line)
			}
		}
		sawMismatch = sawMismatch || strings.Contains(entry.Message, "token mismatch")
		if strings.Contains(entry.Message, "up again") {
			sawUp = entry.ContextMap()["appservice"] == "bridge" && entry.ContextMap()["attempt"] != nil
		}
	}
	if !sawMismatch || !sawUp {
		t.Errorf("logs lack the token mismatch (%v) or the recovery line (%v)", sawMismatch, sawUp)
	}
	if strings.Contains(buf.String(), "hs-bridge") || strings.Contains(buf.String(), "as-bridge") {
		t.Error("metrics leak a token")
	}
}
