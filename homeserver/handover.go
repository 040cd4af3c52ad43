package homeserver

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/asdispatch/asdispatch/dispatcher"
)

// The events table is the stub's log and an event's seq its position. A
// client's 200 means the event is in the log; one goroutine, the only
// writer of the stub's events stream, hands the log over to the dispatcher
// in order and retries a batch until it lands, so a dispatcher store that
// is down delays events but loses none. On start everything after the
// dispatcher's position is handed over before the server takes requests.

// handoverBatch bounds the events one Submit hands over.
const handoverBatch = 500

// handoverRetryMax bounds the wait between attempts while Submit fails.
const handoverRetryMax = 2 * time.Second

type handover struct {
	// stream names the stub's events stream in the dispatcher: its own,
	// made once per data dir, so several stubs can share a PostgreSQL store.
	stream string
	// floor is the last seq handed over before the log had a stream (an
	// upgraded data dir): those events were submitted as they were made.
	floor int64
	pos   atomic.Int64 // the last seq handed over
	kick  chan struct{}
	stop  context.CancelFunc
	done  chan struct{}
}

// openHandover reads (or makes) the stub's events stream name.
func (s *Server) openHandover(ctx context.Context) error {
	if _, err := s.st.db.ExecContext(ctx, `INSERT OR IGNORE INTO log_streams (name, stream, floor)
		SELECT 'events', ?, COALESCE(MAX(seq), 0) FROM events`, "events/"+randomID(8)); err != nil {
		return fmt.Errorf("homeserver: log stream: %w", err)
	}
	s.ho = &handover{kick: make(chan struct{}, 1), done: make(chan struct{})}
	err := s.st.db.QueryRowContext(ctx, `SELECT stream, floor FROM log_streams WHERE name = 'events'`).Scan(&s.ho.stream, &s.ho.floor)
	if err != nil {
		return fmt.Errorf("homeserver: log stream: %w", err)
	}
	return nil
}

// replay hands over every event of the log after the dispatcher's
// position, then starts the goroutine that hands over what comes next.
func (s *Server) replay(ctx context.Context) error {
	p, err := s.disp.Position(ctx, s.ho.stream)
	if err != nil {
		return fmt.Errorf("homeserver: replay: %w", err)
	}
	s.ho.pos.Store(max(p, s.ho.floor))
	replayed := 0
	for {
		n, err := s.handOverOnce(ctx)
		if err != nil {
			return fmt.Errorf("homeserver: replay: %w", err)
		}
		if n == 0 {
			break
		}
		replayed += n
	}
	if replayed > 0 {
		s.log.Info("handed over the events the dispatcher did not have", zap.Int("events", replayed), zap.Int64("position", s.ho.pos.Load()))
	}
	runCtx, cancel := context.WithCancel(context.Background())
	s.ho.stop = cancel
	go s.runHandover(runCtx)
	return nil
}

// kickHandover tells the hand-over goroutine the log has grown.
func (s *Server) kickHandover() {
	select {
	case s.ho.kick <- struct{}{}:
	default:
	}
}

// runHandover hands the log over as it grows, retrying until each batch
// lands.
func (s *Server) runHandover(ctx context.Context) {
	defer close(s.ho.done)
	var wait time.Duration
	failing := false
	for {
		n, err := s.handOverOnce(ctx)
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			if !failing {
				s.log.Warn("handing events over to the dispatcher failed; retrying", zap.Int64("position", s.ho.pos.Load()), zap.Error(err))
				failing = true
			}
			wait = min(max(2*wait, 20*time.Millisecond), handoverRetryMax)
			select {
			case <-time.After(wait):
			case <-ctx.Done():
				return
			}
			continue
		}
		if failing {
			s.log.Info("handing events over to the dispatcher works again", zap.Int64("position", s.ho.pos.Load()))
			failing = false
		}
		wait = 0
		if n == handoverBatch {
			continue
		}
		select {
		case <-s.ho.kick:
		case <-ctx.Done():
			return
		}
	}
}

// handOverOnce submits the next batch of the log; it returns how many
// events it handed over.
func (s *Server) handOverOnce(ctx context.Context) (int, error) {
	after := s.ho.pos.Load()
	evs, err := queryEvents(ctx, s.st.db, `SELECT `+eventCols+` FROM events WHERE seq > ? ORDER BY seq LIMIT ?`, after, handoverBatch)
	if err != nil || len(evs) == 0 {
		return 0, err
	}
	out := make([]dispatcher.Event, len(evs))
	for i, ev := range evs {
		// The body every AS gets: serialized once, with the age it has now.
		aj, err := json.Marshal(ev.viewFor(nil))
		if err != nil {
			return 0, fmt.Errorf("encode event: %w", err)
		}
		out[i] = dispatcher.Event{ID: ev.ID, RoomID: ev.RoomID, Type: ev.Type, Sender: ev.Sender,
			StateKey: ev.StateKey, Membership: ev.membership(), JSON: aj,
			At: dispatcher.Position{Stream: s.ho.stream, Pos: ev.seq}}
	}
	if h := s.beforeHandOver.Load(); h != nil {
		if err := (*h)(ctx, out); err != nil {
			return 0, err
		}
	}
	if err := s.disp.Submit(ctx, out...); err != nil {
		return 0, err
	}
	s.ho.pos.Store(evs[len(evs)-1].seq)
	return len(evs), nil
}

// stopHandover stops the hand-over goroutine; what it did not hand over
// is handed over at the next start.
func (s *Server) stopHandover() {
	if s.ho == nil || s.ho.stop == nil {
		return
	}
	s.ho.stop()
	<-s.ho.done
}
