package dispatcher

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/queue"
	"github.com/asdispatch/asdispatch/registry"
)

// The child side of TestCrashKillNineLosesNothing: a dispatcher that submits
// events forever and prints the id of every event Submit acknowledged.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv("ASDISPATCH_CRASH_CHILD_DIR")
	if dir == "" {
		t.Skip("child process of TestCrashKillNineLosesNothing")
	}
	url := os.Getenv("ASDISPATCH_CRASH_CHILD_URL")
	round := os.Getenv("ASDISPATCH_CRASH_CHILD_ROUND")
	r, _, err := registry.Parse("crash.yaml", []byte(registration("crash", url, `@irc_.*`, "", "", false)))
	if err != nil {
		t.Fatal(err)
	}
	set, _, err := registry.NewSet("hs", []*registry.Registration{r})
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(context.Background(), Config{
		Registry: registry.NewRegistry(set),
		DataDir:  dir,
		Logger:   zap.NewNop(),
		Queue:    queue.Options{RetryInitial: 5 * time.Millisecond, RetryMax: 20 * time.Millisecond, MaxEvents: 7},
	})
	if err != nil {
		t.Fatal(err)
	}
	out := bufio.NewWriter(os.Stdout)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				id := fmt.Sprintf("$r%s-w%d-%06d", round, w, i)
				if err := d.Submit(context.Background(), ev(id, "!r:hs", "m.room.message", "@irc_x:hs", nil, "")); err != nil {
					return
				}
				mu.Lock()
				fmt.Fprintln(out, "ACK", id)
				out.Flush()
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
}

func TestCrashKillNineLosesNothing(t *testing.T) {
	if testing.Short() {
		t.Skip("spawns processes")
	}
	seed := time.Now().UnixNano()
	if s := os.Getenv("ASDISPATCH_CRASH_SEED"); s != "" {
		fmt.Sscan(s, &seed)
	}
	t.Logf("seed %d (replay with ASDISPATCH_CRASH_SEED=%d)", seed, seed)
	rng := rand.New(rand.NewSource(seed))

	var mu sync.Mutex
	bodies := map[string][]byte{} // txn id -> first body
	var delivered []string        // event ids of first deliveries of each txn id
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		id := strings.TrimPrefix(r.URL.Path, "/_matrix/app/v1/transactions/")
		mu.Lock()
		defer mu.Unlock()
		if prev, ok := bodies[id]; ok {
			if !bytes.Equal(prev, body) {
				t.Errorf("txn %s sent with two bodies:\n%s\n%s", id, prev, body)
			}
			w.Write([]byte("{}"))
			return
		}
		bodies[id] = body
		var txn struct {
			Events []struct {
				EventID string `json:"event_id"`
			} `json:"events"`
		}
		json.Unmarshal(body, &txn)
		for _, e := range txn.Events {
			delivered = append(delivered, e.EventID)
		}
		w.Write([]byte("{}"))
	}))
	defer as.Close()

	dir := t.TempDir()
	var acked []string
	const rounds = 8
	for round := 0; round <= rounds; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
		cmd.Env = append(os.Environ(),
			"ASDISPATCH_CRASH_CHILD_DIR="+dir,
			"ASDISPATCH_CRASH_CHILD_URL="+as.URL,
			fmt.Sprintf("ASDISPATCH_CRASH_CHILD_ROUND=%d", round))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1024)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		// Let it run until it acknowledged some events, then kill it at a
		// random moment.
		life := time.Duration(50+rng.Intn(400)) * time.Millisecond
		if round == rounds {
			life = 0 // the last run only drains what is queued
		}
		timer := time.NewTimer(time.Second * 30)
		started := false
		deadline := time.Time{}
	read:
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					break read
				}
				if id, found := strings.CutPrefix(l, "ACK "); found {
					acked = append(acked, id)
					if !started {
						started = true
						deadline = time.Now().Add(life)
					}
				}
				if started && time.Now().After(deadline) {
					break read
				}
			case <-timer.C:
				t.Fatal("child acknowledged nothing within 30s")
			}
		}
		timer.Stop()
		if round == rounds {
			// Wait until everything acknowledged was delivered.
			waitUntil := time.Now().Add(30 * time.Second)
			for {
				mu.Lock()
				have := uniq(delivered)
				mu.Unlock()
				missing := 0
				for _, id := range acked {
					if !have[id] {
						missing++
					}
				}
				if missing == 0 || time.Now().After(waitUntil) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		cmd.Process.Signal(syscall.SIGKILL)
		for range lines {
			// Acks printed after the kill decision still count: Submit returned.
		}
		cmd.Wait()
	}

	mu.Lock()
	defer mu.Unlock()
	got := map[string]bool{}
	for _, id := range delivered {
		got[id] = true
	}
	for _, id := range acked {
		if !got[id] {
			t.Errorf("event %s acknowledged by Submit but never delivered", id)
		}
	}
	// Per writer, events arrive in submission order.
	last := map[string]string{}
	for _, id := range delivered {
		w := id[:strings.LastIndex(id, "-")]
		if id <= last[w] {
			t.Errorf("%s delivered after %s", id, last[w])
		}
		last[w] = id
	}
	t.Logf("%d kills, %d events acknowledged, %d delivered, %d transactions", rounds, len(acked), len(delivered), len(bodies))
}

func uniq(ids []string) map[string]bool {
	m := make(map[string]bool, len(ids))
	for _, id := range ids {
		m[id] = true
	}
	return m
}
