package main

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"
)

// sink is the ASes' one HTTP server: /asN/... is AS N, each with its own
// hs_token. One listener for all of them, as a host running many bridges
// behind one reverse proxy would have: the driver holds one socket per open
// connection, not one listener per AS.
type sink struct {
	mu sync.Mutex
	// want is how many messages each AS is to get; got when each arrived
	// first (by message number).
	want  []int
	got   []map[int]time.Time
	gotIn []map[int]string // the txnId that brought it
	ids   []map[string]struct{}
	// resent counts messages that came again as another event (a client
	// retry of a send the server had persisted but answered 5xx).
	resent   int
	done     int
	complete chan struct{}
	// warm: the AS has the warm-up message ("w") of its group.
	warm   []bool
	warmN  int
	warmed chan struct{}

	// down makes every AS answer 503 (the AS is away).
	down bool
	// attempts and refused count transaction PUTs, all and those answered 503.
	attempts int
	refused  int
	// refusedBy counts each AS's refused PUTs (crash: kill once each was refused).
	refusedBy []int
	txns      int // transactions accepted
	// accepted is each AS's txnIds taken (when); repeats counts PUTs of
	// one of them again.
	accepted []map[string]time.Time
	repeats  int
	dups     int // events an AS accepted a second time, in another transaction
	// last is each AS's highest message number so far; outOfOrder counts
	// messages that arrived after a higher one (exact with one sender; with
	// several, concurrent sends may be persisted in either order);
	// firstDisorder describes the first one.
	last          []int
	outOfOrder    int
	firstDisorder string
	// bodies is each AS's txnId -> hash of the first body sent under it,
	// over every attempt (refused ones too: the AS saw them); reused counts
	// txnIds later sent with another body.
	bodies []map[string]txnSeen
	reused int
	// firstAfterUp is the first transaction accepted after down was cleared.
	firstAfterUp time.Time
	// lastNew is when a message last arrived for the first time at an AS
	// (or when the sink was made).
	lastNew time.Time
}

type txnSeen struct {
	hash   uint64
	events int
	differ bool
}

func newSink(want []int) *sink {
	n := len(want)
	s := &sink{want: want, got: make([]map[int]time.Time, n), gotIn: make([]map[int]string, n), ids: make([]map[string]struct{}, n), complete: make(chan struct{}),
		warm: make([]bool, n), warmed: make(chan struct{}), refusedBy: make([]int, n),
		last: make([]int, n), bodies: make([]map[string]txnSeen, n), accepted: make([]map[string]time.Time, n), lastNew: time.Now()}
	for i := range n {
		s.got[i] = map[int]time.Time{}
		s.gotIn[i] = map[int]string{}
		s.ids[i] = map[string]struct{}{}
		s.bodies[i] = map[string]txnSeen{}
		s.accepted[i] = map[string]time.Time{}
		s.last[i] = -1
	}
	for _, w := range want {
		if w == 0 {
			s.done++
		}
	}
	if s.done == n {
		close(s.complete)
	}
	return s
}

func (s *sink) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/as")
	n, err := strconv.Atoi(strings.SplitN(rest, "/", 2)[0])
	if !ok || err != nil || n < 0 || n >= len(s.got) || r.Header.Get("Authorization") != "Bearer hs-"+strconv.Itoa(n) {
		w.WriteHeader(403)
		return
	}
	if r.Method == "POST" && strings.HasSuffix(r.URL.Path, "/_matrix/app/v1/ping") {
		w.Write([]byte("{}"))
		return
	}
	_, txnID, isTxn := strings.Cut(r.URL.Path, "/_matrix/app/v1/transactions/")
	if r.Method != "PUT" || !isTxn {
		w.WriteHeader(404)
		w.Write([]byte(`{"errcode":"M_NOT_FOUND"}`))
		return
	}
	raw, err := io.ReadAll(r.Body)
	var txn struct {
		Events []struct {
			ID      string `json:"event_id"`
			Type    string `json:"type"`
			Content struct {
				Body string `json:"body"`
			} `json:"content"`
		} `json:"events"`
	}
	if err != nil || json.Unmarshal(raw, &txn) != nil {
		w.WriteHeader(400)
		return
	}
	h := fnv.New64a()
	h.Write(raw)
	sum := h.Sum64()
	now := time.Now()

	s.mu.Lock()
	defer s.mu.Unlock()
	s.attempts++
	if prev, seen := s.bodies[n][txnID]; !seen {
		s.bodies[n][txnID] = txnSeen{hash: sum, events: len(txn.Events)}
	} else if prev.hash != sum && !prev.differ {
		s.reused++
		prev.differ = true
		s.bodies[n][txnID] = prev
		if s.reused == 1 {
			s.firstDisorder += fmt.Sprintf(" [as%d txn %s: %d events, then %d]", n, txnID, prev.events, len(txn.Events))
		}
	}
	if s.down {
		s.refused++
		s.refusedBy[n]++
		w.WriteHeader(503)
		return
	}
	if _, again := s.accepted[n][txnID]; again {
		// A retry of a transaction the AS already took (the spec's
		// idempotence by txnId): not a duplicate, nothing to process.
		s.repeats++
		w.Write([]byte("{}"))
		return
	}
	s.accepted[n][txnID] = now
	s.txns++
	if s.firstAfterUp.IsZero() {
		s.firstAfterUp = now
	}
	for _, e := range txn.Events {
		if e.Type != "m.room.message" {
			continue
		}
		if e.Content.Body == "w" {
			if !s.warm[n] {
				s.warm[n] = true
				s.warmN++
				if s.warmN == len(s.warm) {
					close(s.warmed)
				}
			}
			continue
		}
		i, err := strconv.Atoi(strings.TrimPrefix(e.Content.Body, "m"))
		if err != nil {
			continue
		}
		if _, seen := s.ids[n][e.ID]; !seen {
			s.ids[n][e.ID] = struct{}{}
			if _, again := s.got[n][i]; again {
				// The same message as a second event: the server answered
				// a send 5xx after persisting it and the retry made another.
				s.resent++
				continue
			}
		} else if _, seen := s.got[n][i]; seen {
			s.dups++
			if s.dups == 1 {
				s.firstDisorder += fmt.Sprintf(" [as%d: m%d again in txn %s, first in txn %s]", n, i, txnID, s.gotIn[n][i])
			}
			continue
		}
		s.got[n][i] = now
		s.gotIn[n][i] = txnID
		s.lastNew = now
		if i < s.last[n] {
			s.outOfOrder++
			if s.outOfOrder == 1 {
				s.firstDisorder = fmt.Sprintf("as%d: m%d after m%d", n, i, s.last[n]) + s.firstDisorder
			}
		}
		s.last[n] = max(s.last[n], i)
		if len(s.got[n]) == s.want[n] {
			s.done++
			if s.done == len(s.got) {
				close(s.complete)
			}
		}
	}
	w.Write([]byte("{}"))
}

// missing counts the messages not delivered yet, over all ASes.
func (s *sink) missing() int {
	m := 0
	for i, got := range s.got {
		m += s.want[i] - len(got)
	}
	return m
}
